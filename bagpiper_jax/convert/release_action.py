"""Releases written by the training loop: `config.release_every_steps` (a train_loop PeriodicAction).

Every `release_every_steps` steps (and at the last step) the run writes `<workdir>/releases/<step>/`,
the same directory `python -m bagpiper_jax.convert.release export --ckpt=<workdir> --step=<step>`
writes from that step's checkpoint (tests/test_release_action.py checks the tensors bit for bit).

Multi-host safety. The parameters are global arrays sharded over every process; no process can read
one whole (`np.asarray` on a non-fully-addressable array raises, the crash MaxText and levanter users
report when exporting on pods). `LiveParamsSource` gives release.write_release the same read API as
an Orbax checkpoint reader, and every read is a collective: a jitted slice (one layer of a scanned
leaf, or a block of rows of a big unscanned one) whose output sharding is replicated, so each process
ends up with that one slice in host memory. All processes run the same reads in the same order
(the rules table fixes it); only process 0 writes files. Host memory: one tensor at a time, like the
file-based export. Device memory: one replicated slice (at most `block_bytes`, 256 MiB, per device).

Where files go: a local workdir gets `<step>.partial/`, renamed to `<step>/` when complete; a URL
(gs://) workdir is staged in a local temporary directory on process 0 and copied, `release.json`
last. A step whose release.json already exists (a resumed run passing the same step again) is skipped.
The tokenizer and codec are resolved when the run starts (config.release, else the training data's
index.json), so a run that cannot release fails before its first step rather than hours later.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from bagpiper_jax import paths
from bagpiper_jax.convert import cli_util, params_io, release, release_assets
from bagpiper_jax.model.config import ModelConfig
from bagpiper_jax.periodic import PeriodicAction

RELEASES = "releases"
Path = tuple[str, ...]


class LiveParamsSource:
  """params_io.ParamsReader's read API (infos / info / read) over a live, sharded param tree.

  Every `read` is a collective over all processes holding the arrays; call it in the same order on
  every process.
  """

  def __init__(self, params: Any, block_bytes: int = 256 * 2**20):
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    self.leaves: dict[Path, jax.Array] = {tuple(str(k.key) for k in kp): v for kp, v in flat}
    self.item = "the live train state"
    self.block_bytes = int(block_bytes)
    self.band_bytes = 0  # ParamsReader's knob; reads here are sized by block_bytes
    self._jitted: dict = {}

  def info(self, path: Path) -> params_io.LeafInfo:
    x = self.leaves[path]
    return params_io.LeafInfo(".".join(path), tuple(x.shape), np.dtype(x.dtype), tuple(x.shape))

  def infos(self) -> dict[Path, params_io.LeafInfo]:
    return {p: self.info(p) for p in self.leaves}

  def _fn(self, kind: str, x: jax.Array, rows: int = 0):
    """A jitted slice whose output is replicated over the leaf's mesh (cached per mesh, kind, rows)."""
    mesh = x.sharding.mesh
    key = (kind, id(mesh), rows)
    if key not in self._jitted:
      out = NamedSharding(mesh, PartitionSpec())
      if kind == "whole":
        f = lambda a: a
      elif kind == "index":
        f = lambda a, i: jax.lax.dynamic_index_in_dim(a, i, axis=0, keepdims=False)
      else:
        f = lambda a, i: jax.lax.dynamic_slice_in_dim(a, i, rows, axis=0)
      self._jitted[key] = jax.jit(f, out_shardings=out)
    return self._jitted[key]

  @staticmethod
  def _host(y: jax.Array) -> np.ndarray:
    return np.asarray(y.addressable_data(0))

  def read(self, path: Path, layer: int | None = None) -> np.ndarray:
    x = self.leaves[path]
    if not isinstance(getattr(x, "sharding", None), NamedSharding):  # host or single-device: no gather
      a = np.asarray(x)
      return np.array(a if layer is None else a[layer])
    if layer is not None:
      return self._host(self._fn("index", x)(x, np.int32(layer)))
    n = x.shape[0] if x.ndim else 0
    row_bytes = int(np.prod(x.shape[1:], dtype=np.int64)) * np.dtype(x.dtype).itemsize if x.ndim else 0
    if x.ndim == 0 or n * row_bytes <= self.block_bytes:
      return self._host(self._fn("whole", x)(x))
    rows = max(1, min(n, self.block_bytes // max(row_bytes, 1)))
    out = np.empty(x.shape, np.dtype(x.dtype))
    f = self._fn("rows", x, rows)
    for lo in range(0, n, rows):
      start = min(lo, n - rows)  # a fixed block size (one compile); the last block overlaps the previous
      block = self._host(f(x, np.int32(start)))
      out[lo:min(lo + rows, n)] = block[lo - start:]
    return out

  def close(self):
    self.leaves.clear()


class ReleaseAction(PeriodicAction):
  """Writes <workdir>/releases/<step>/ every config.release_every_steps (see the module docstring)."""

  def __init__(self, config, setup, workdir: str):
    super().__init__(int(config.release_every_steps))
    self.config, self.workdir = config, workdir
    self.cfg: ModelConfig = setup.cfg
    self.assets = None
    if self.every > 0:
      r = config.release
      self.assets = release_assets.resolve_assets(
          config.to_dict(), tokenizer=r.tokenizer or None, codec=r.codec or None,
          with_tokenizer=bool(r.with_tokenizer), with_codec=bool(r.with_codec))
      if self.assets.tokenizer:  # the tokenizer must fit this model: check now, not at the first release
        release_assets.tokenizer_files(self.assets.tokenizer, self.cfg, text_id0_as_pad=self.assets.text_id0_as_pad)
      logging.info("releases every %d steps to %s/%s: %s", self.every, workdir, RELEASES, self.assets.describe())

  def run(self, step: int, state) -> dict:
    root = epath.Path(self.workdir) / RELEASES
    final = root / str(step)
    if (final / release.RELEASE_JSON).exists():
      logging.info("release %s exists; not written again", final)
      return {}
    t0 = time.perf_counter()
    writer = jax.process_index() == 0
    url = paths.is_url(self.workdir)
    stage = None
    if writer:
      if url:
        stage = tempfile.mkdtemp(prefix=f"bagpiper_release_{step}_")
      else:
        stage = os.path.join(str(root), f"{step}.partial")
      if not url:
        shutil.rmtree(stage, ignore_errors=True)  # left by an interrupted run
        shutil.rmtree(str(final), ignore_errors=True)  # incomplete (no release.json)
    r = self.config.release
    summary = release.write_release(
        LiveParamsSource(state.params), self.cfg, stage or "", self.assets, dtype=r.dtype,
        max_shard_bytes=cli_util.parse_size(r.max_shard_size), xcodec_hf_model_tag=r.xcodec_hf_model_tag,
        writer=writer, provenance={"step": step, "checkpoint": None, "workdir": self.workdir})
    if writer:
      if url:
        release.publish(stage, str(final))
        shutil.rmtree(stage, ignore_errors=True)
      else:
        os.replace(stage, str(final))
    multihost_utils.sync_global_devices(f"bagpiper_release_{step}")
    dt = time.perf_counter() - t0
    if writer:
      print(f"release step {step}: {final} ({summary['tensors']} tensors, {summary['total_bytes'] / 1e9:.2f} GB, "
            f"{dt:.1f} s)", flush=True)
    return {"release_seconds": dt}
