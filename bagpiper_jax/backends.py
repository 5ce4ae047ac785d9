"""Which JAX platforms an entry point lets JAX initialise.

The `libtpu` wheel is installed for ahead-of-time compilation (launch/aot_compile.py compiles for
TPU slices on a CPU host). Installed, it makes JAX probe for TPU hardware at start-up on every
machine, which on a CPU or GPU host prints scary errors ("unexpected worker hostname",
"No jellyfish device found") and costs seconds of metadata-server timeouts.

`skip_tpu_probe_without_tpu()` is the first thing each command-line entry point does: when the
user has not chosen platforms (JAX_PLATFORMS unset) and this host has no TPU device nodes
(/dev/accel*, /dev/vfio/<n>: what TPU VMs expose), JAX is limited to the platforms that are
present (cuda when a CUDA plugin is installed, then cpu). On a TPU VM, or with JAX_PLATFORMS
set, nothing changes. It must run before JAX initialises its backends (any device query).
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import os

import jax

_TPU_DEVICE_NODES = ("/dev/accel*", "/dev/vfio/[0-9]*")
_CUDA_PLUGINS = ("jax_cuda13_plugin", "jax_cuda12_plugin", "jax_plugins.xla_cuda13", "jax_plugins.xla_cuda12")


def tpu_attached() -> bool:
  return any(glob.glob(p) for p in _TPU_DEVICE_NODES)


def _has_module(name: str) -> bool:
  try:
    return importlib.util.find_spec(name) is not None
  except ModuleNotFoundError:
    return False


def skip_tpu_probe_without_tpu() -> str | None:
  """Limits JAX to cuda/cpu when no TPU is attached and JAX_PLATFORMS is unset. Returns the
  platforms chosen, or None when nothing was changed."""
  if os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms or tpu_attached():
    return None
  platforms = ("cuda," if any(_has_module(m) for m in _CUDA_PLUGINS) else "") + "cpu"
  jax.config.update("jax_platforms", platforms)
  logging.info("no TPU device nodes on this host: JAX platforms %r (set JAX_PLATFORMS to override)",
               platforms)
  return platforms
