"""Small helpers shared by the conversion CLIs (hf_init, release)."""

from __future__ import annotations

import contextlib
import ctypes
import re
import resource
import sys

from bagpiper_jax import paths
from bagpiper_jax.convert import params_io
from bagpiper_jax.model.config import ModelConfig

# Bad input (a missing path, a checkpoint that does not match, an unusable tokenizer, ...): every
# such error the conversions raise is one of these and carries a message naming the file or flag.
INPUT_ERRORS = (ValueError, FileNotFoundError, paths.CheckpointNotFound, params_io.ParamsIOError)


@contextlib.contextmanager
def one_line_errors(what: str):
  """Bad input ends the command with one line on stderr and exit status 1, not a traceback."""
  try:
    yield
  except INPUT_ERRORS as e:
    print(f"[{what}] ERROR: {e}", file=sys.stderr, flush=True)
    sys.exit(1)


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def tune_malloc(mmap_threshold: int = 1 << 20) -> bool:
  """Serve every allocation >= 1 MiB from its own mmap, returned to the OS on free.

  glibc raises its mmap threshold dynamically (up to 32 MB) after large frees, after which
  TensorStore's per-chunk buffers land in malloc arenas and stay resident: reading a 1.3 GB leaf
  then peaked at 1.7x its size instead of 1.0x. Fixing the threshold keeps a conversion's peak at
  what it actually holds. No-op (False) where glibc is not available.
  """
  try:
    return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)))
  except (OSError, AttributeError):
    return False


def peak_rss_bytes() -> int:
  """Peak resident set size of this process so far (Linux reports ru_maxrss in KiB)."""
  kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(kib) * (1 if sys.platform == "darwin" else 1024)


def report_peak_rss(what: str) -> int:
  """Prints `peak RSS` on stdout (the README figures and the memory tests read this line)."""
  peak = peak_rss_bytes()
  print(f"[{what}] peak RSS: {peak / 2**20:.0f} MiB ({peak} bytes)", flush=True)
  return peak


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(s: str) -> int:
  """'5GB' -> 5e9, '500MiB' -> 500 * 2**20, '1234' -> 1234 (HF's max_shard_size convention)."""
  m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(s))
  if not m or m.group(2).upper() not in _UNITS:
    raise ValueError(f"cannot parse size {s!r}; use e.g. 5GB, 500MB, 2GiB or a byte count")
  return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def model_config_from_flag(config) -> ModelConfig | None:
  """The `model` section of an ml_collections config (from --config=configs/x.py), or None."""
  if config is None:
    return None
  if "model" not in config:
    raise ValueError("--config has no 'model' section")
  return ModelConfig.from_dict(config.model)
