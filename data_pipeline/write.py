r"""Command line: manifests / Hub parquet / WebDataset tars -> ArrayRecord shards, on Apache Beam.

  # This machine (DirectRunner, one worker per core):
  python -m data_pipeline.write \
      --manifest='data/*.jsonl' --manifest='hub/train-*.parquet' \
      --out_dir=/data/shards --tokenizer=/models/qwen3/tokenizer.json \
      --codec=xcodec:/models/xcodec-hubert-general --shard_size=1000

  # A cluster: the same flags plus Beam's pipeline options (see README "Data").
  python -m data_pipeline.write ... --out_dir=gs://bucket/shards \
      --runner=DataflowRunner --project=P --region=R --temp_location=gs://bucket/tmp \
      --sdk_container_image=REGION-docker.pkg.dev/P/REPO/bagpiper-data:TAG --machine_type=n2-standard-16

--manifest may repeat and takes globs (local or gs://); the kind of each file goes by its name:
.jsonl[.gz|.zst] manifests, .parquet (the Hub's format, audio embedded), .tar[.gz|.zst] / .tgz
(WebDataset). Flags this command does not define are Beam pipeline options (--runner,
--direct_num_workers, --num_workers, --project, ...). Re-running the same command skips finished
shards. Exit status: 0 when the run finished (bad lines/files are reported in errors.jsonl, not
fatal); 1 when some shards could not be written (index.json "incomplete_shards"; re-run to retry);
2 for unusable flags (a missing input, an unwritable --out_dir, ...), before any work.
See data_pipeline/writer.py for the pipeline and the output layout.
"""

from __future__ import annotations

import dataclasses
import glob
import sys

from absl import app
from absl import flags

from bagpiper_jax import backends
from bagpiper_jax import paths
from data_pipeline import build
from data_pipeline import codes
from data_pipeline import filters
from data_pipeline import fs
from data_pipeline import writer

_MANIFEST = flags.DEFINE_multi_string(
    "manifest", [], "Input file(s): JSONL manifests, Hub parquet, WebDataset tars; repeatable, globs "
    "allowed, local or gs://.")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Output directory (one sub-directory per source).")
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", None, "tokenizer.json (HF `tokenizers`), a SentencePiece .model, or a directory "
    "holding tokenizer.json.")
_CODEC = flags.DEFINE_string(
    "codec", "", "Assistant-audio codes: 'xcodec:<XcodecModel dir>', 'npy' (<audio stem>.npy "
    "next to the audio), 'npy:<dir>', or '' when no record needs codes.")
_CODEC_DEVICE = flags.DEFINE_enum("codec_device", "cpu", list(codes.CODEC_DEVICES),
                                  "Where the X-Codec encoder runs on each worker.")
_CODEC_BATCH = flags.DEFINE_integer("codec_batch_size", 8, "Most clips of equal length per X-Codec "
                                    "call (1: one at a time).")
_SHARD_SIZE = flags.DEFINE_integer("shard_size", 1000, "Items per shard (per source).")
_SFT_SOURCE = flags.DEFINE_string("sft_source", "sft", "Source (subset) name for SFT `messages` lines.")
_SAMPLE_RATE_POLICY = flags.DEFINE_enum(
    "sample_rate_policy", "resample", list(build.SAMPLE_RATE_POLICIES),
    "Audio not at 16 kHz: 'resample' (and report in warnings.jsonl) or 'error' (skip the record).")
_CUT = flags.DEFINE_bool(
    "cut_embedded_segments", False, "Parquet/tar inputs: cut [start_time, end_time) out of the embedded "
    "audio (when it is the whole source recording); by default the embedded audio is the clip.")
_CURATION = flags.DEFINE_enum("curation", "none", list(filters.PRESETS),
                              "Curation filters: 'reference' = the recipe's thresholds, 'none' = off. "
                              "--filter_<name> flags override single thresholds.")
_FILTER_FLAGS = {f.name: flags.DEFINE_string(f"filter_{f.name}", None,
                                             f"Override {f.name} of --curation ('off' disables).")
                 for f in dataclasses.fields(filters.FilterSettings)}
_PROGRESS = flags.DEFINE_bool("progress", True, "Print a progress line (shards done, ETA).")
_TEXT_ID0_AS_PAD = flags.DEFINE_bool(
    "text_id0_as_pad", True, "Map the tokenizer's raw id 0 to <|pad|> as the reference does (default); "
    "--notext_id0_as_pad maps it to 256 like every other id (docs/model.md#vocabulary).")

flags.mark_flags_as_required(["out_dir", "tokenizer"])


def filter_settings() -> filters.FilterSettings:
  """--curation preset with the --filter_<name> overrides applied."""
  s = filters.PRESETS[_CURATION.value]
  over = {}
  for f in dataclasses.fields(filters.FilterSettings):
    raw = _FILTER_FLAGS[f.name].value
    if raw is None:
      continue
    try:
      if f.name == "non_latin":
        over[f.name] = raw.lower() in ("1", "true", "on", "yes")
      elif raw.lower() == "off":
        over[f.name] = None
      else:
        over[f.name] = (int if "int" in str(f.type) else float)(raw)
    except ValueError as e:
      raise app.UsageError(f"--filter_{f.name}={raw!r}: expected a number or 'off'") from e
  return dataclasses.replace(s, **over)


def expand(patterns: list[str]) -> list[str]:
  """Input files in the order given, each glob sorted; a pattern matching nothing is an error."""
  out = []
  for pattern in patterns:
    pattern = paths.resolve(pattern)
    matches = fs.match(pattern) if fs.is_remote(pattern) else sorted(glob.glob(pattern))
    if not matches:
      raise app.UsageError(f"--manifest {pattern!r} matches no file")
    out += matches
  if not out:
    raise app.UsageError("give at least one --manifest")
  return out


def _parse(argv: list[str]) -> list[str]:
  """absl takes the flags it defines; the rest go to Beam."""
  return flags.FLAGS(argv, known_only=True)


def main(argv):
  backends.skip_tpu_probe_without_tpu()
  beam_args = argv[1:]
  stray = [a for a in beam_args if not a.startswith("-")]
  if stray:
    raise app.UsageError(f"unexpected arguments: {stray}")
  settings = build.BuildSettings(tokenizer=paths.resolve(_TOKENIZER.value), codec=_CODEC.value,
                                 sample_rate_policy=_SAMPLE_RATE_POLICY.value, filters=filter_settings(),
                                 text_id0_as_pad=_TEXT_ID0_AS_PAD.value)
  kind, _, arg = settings.codec.partition(":")
  if arg:
    settings = dataclasses.replace(settings, codec=f"{kind}:{paths.resolve(arg)}")
  try:
    index = writer.write_shards(expand(_MANIFEST.value), paths.resolve(_OUT_DIR.value), settings,
                                shard_size=_SHARD_SIZE.value, sft_source=_SFT_SOURCE.value,
                                progress=_PROGRESS.value, codec_device=_CODEC_DEVICE.value,
                                codec_batch_size=_CODEC_BATCH.value, cut_segments=_CUT.value,
                                pipeline_args=beam_args)
  except ValueError as e:  # unusable flags or inputs: one clear line, no traceback
    print(f"data_pipeline.write: {e}", file=sys.stderr)
    return 2
  return 1 if index["incomplete_shards"] else 0


if __name__ == "__main__":
  app.run(main, flags_parser=_parse)
