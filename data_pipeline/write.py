"""Command line: JSONL manifests -> ArrayRecord shards of bagpiper records.

  python -m data_pipeline.write \\
      --manifest=music.jsonl --manifest=sound.jsonl --manifest=sft.jsonl \\
      --out_dir=/data/shards --tokenizer=/models/qwen3/tokenizer.json \\
      --codec=xcodec:/models/xcodec-hubert-general --shard_size=1000 --num_workers=8

--manifest may repeat and takes globs. Re-running the same command skips finished shards. Exit
status: 0 when the run finished (bad lines/files are reported in errors.jsonl, not fatal); 1 when
some shards could not be written (see index.json "incomplete_shards"; re-run to retry them).
See data_pipeline/writer.py for the output layout.
"""

from __future__ import annotations

import glob

from absl import app
from absl import flags

from data_pipeline import build
from data_pipeline import writer

_MANIFEST = flags.DEFINE_multi_string("manifest", [], "JSONL manifest(s); repeatable, globs allowed.")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Output directory (one sub-directory per source).")
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", None, "tokenizer.json (HF `tokenizers`), a SentencePiece .model, or a directory "
    "holding tokenizer.json.")
_CODEC = flags.DEFINE_string(
    "codec", "", "Assistant-audio codes: 'xcodec:<local XcodecModel dir>', 'npy' (<audio stem>.npy "
    "next to the audio), 'npy:<dir>', or '' when no record needs codes.")
_SHARD_SIZE = flags.DEFINE_integer("shard_size", 1000, "Items per shard (per source).")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", 2, "Worker processes (<= 1: in-process).")
_SFT_SOURCE = flags.DEFINE_string("sft_source", "sft", "Source (subset) name for SFT `messages` lines.")
_SAMPLE_RATE_POLICY = flags.DEFINE_enum(
    "sample_rate_policy", "resample", list(build.SAMPLE_RATE_POLICIES),
    "Audio not at 16 kHz: 'resample' (and report in warnings.jsonl) or 'error' (skip the record).")
_PROGRESS = flags.DEFINE_bool("progress", True, "Print a progress line (items/s, ETA).")
_TEXT_ID0_AS_PAD = flags.DEFINE_bool(
    "text_id0_as_pad", True, "Map the tokenizer's raw id 0 to <|pad|> as the reference does (default); "
    "--notext_id0_as_pad maps it to 256 like every other id (docs/model.md#vocabulary).")

flags.mark_flags_as_required(["out_dir", "tokenizer"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  manifests = []
  for pattern in _MANIFEST.value:
    matches = sorted(glob.glob(pattern))
    if not matches:
      raise app.UsageError(f"--manifest {pattern!r} matches no file")
    manifests += matches
  if not manifests:
    raise app.UsageError("give at least one --manifest")
  settings = build.BuildSettings(tokenizer=_TOKENIZER.value, codec=_CODEC.value,
                                 sample_rate_policy=_SAMPLE_RATE_POLICY.value,
                                 text_id0_as_pad=_TEXT_ID0_AS_PAD.value)
  index = writer.write_shards(manifests, _OUT_DIR.value, settings, shard_size=_SHARD_SIZE.value,
                              num_workers=_NUM_WORKERS.value, sft_source=_SFT_SOURCE.value,
                              progress=_PROGRESS.value)
  return 1 if index["incomplete_shards"] else 0


if __name__ == "__main__":
  app.run(main)
