"""JAX's persistent compilation cache for a run, and a count of what a run compiled.

A restarted run (preemption, resume, a second stage on the same slice) compiles the same programs
again: for the 8B step that is minutes on every host. With the cache on, XLA executables are
written to `config.compilation_cache_dir` and read back by the next start. The directory is
resolved against the workdir when relative (default `<workdir>/compilation_cache`); an absolute
path or `gs://...` is used as is (one cache shared by several runs); "" turns the cache off.
`config.compilation_cache_min_compile_secs` is the compile time below which a program is not
written (0: every program, so a restart compiles nothing at all).

`CompileCounter` listens to jax.monitoring: every backend compilation request, and those served
from the persistent cache; `compiled = requests - cache hits` is what a start really compiled.
"""

from __future__ import annotations

import os
import threading

import jax
from absl import logging

from bagpiper_jax import paths

# jax.monitoring event names (jax 0.10: jax/_src/dispatch.py BACKEND_COMPILE_EVENT, compiler.py).
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


def cache_dir(config, workdir: str) -> str:
  """The cache directory of this run ("" = off)."""
  d = str(config.compilation_cache_dir)
  if not d:
    return ""
  if paths.is_url(d) or os.path.isabs(d):
    return d
  return os.path.join(workdir, d)


def setup(config, workdir: str) -> str:
  """Turns the persistent cache on for this process (before anything compiles). Returns the directory."""
  d = cache_dir(config, workdir)
  if not d:
    logging.info("persistent compilation cache off (config.compilation_cache_dir is empty)")
    return ""
  jax.config.update("jax_compilation_cache_dir", d)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float(config.compilation_cache_min_compile_secs))
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  logging.info("persistent compilation cache in %s", d)
  return d


class CompileCounter:
  """Counts backend compilations and persistent-cache hits from now on until `close()`
  (jax.monitoring listeners)."""

  def __init__(self):
    self._lock = threading.Lock()
    self.requests = 0
    self.cache_hits = 0
    jax.monitoring.register_event_duration_secs_listener(self._on_duration)
    jax.monitoring.register_event_listener(self._on_event)

  def _on_duration(self, event: str, duration: float, **kwargs) -> None:
    del duration, kwargs
    if event == _COMPILE_EVENT:
      with self._lock:
        self.requests += 1

  def _on_event(self, event: str, **kwargs) -> None:
    del kwargs
    if event == _CACHE_HIT_EVENT:
      with self._lock:
        self.cache_hits += 1

  def close(self) -> None:
    jax.monitoring.unregister_event_duration_listener(self._on_duration)
    jax.monitoring.unregister_event_listener(self._on_event)

  @property
  def compiled(self) -> int:
    return self.requests - self.cache_hits

  def summary(self, directory: str) -> str:
    where = f"persistent cache {directory}" if directory else "persistent cache off"
    return (f"compilation: {self.requests} programs, {self.cache_hits} loaded from the {where}, "
            f"{self.compiled} compiled")
