"""params_io: LazyArray leaves written block by block restore exactly; ParamsReader reads leaves
and layer slices whatever the chunking (including arrays chunked across layers)."""

from __future__ import annotations

import json
import os
import re

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest

from bagpiper_jax.convert import params_io


def test_lazy_leaves_round_trip_with_uneven_blocks(tmp_path):
  rng = np.random.default_rng(0)
  stacked = rng.standard_normal((3, 7, 5)).astype(np.float32)
  rows = rng.standard_normal((11, 4)).astype(ml_dtypes.bfloat16)
  cols = rng.standard_normal((4, 13)).astype(np.float32)
  small = 40  # bytes per block: forces uneven splits (last block shorter) on every axis used
  calls = []

  def layer(i):
    calls.append(i)
    return stacked[i]
  tree = {
      "layers": {"k": params_io.LazyArray.per_layer(stacked.shape, np.float32, layer, max_block_bytes=small)},
      "rows": params_io.LazyArray.blocked(rows.shape, rows.dtype, lambda lo, hi: rows[lo:hi], max_block_bytes=small),
      "cols": params_io.LazyArray.blocked(cols.shape, np.float32, lambda lo, hi: cols[:, lo:hi], axis=1,
                                          max_block_bytes=small),
      "whole": params_io.LazyArray.computed(cols.shape, np.float32, lambda: cols, max_block_bytes=small),
      "scalar": params_io.LazyArray.computed((), np.float32, lambda: np.float32(3.5)),
      "plain": np.arange(6, dtype=np.int32),
  }
  params_io.save_params(tmp_path / "p", tree)
  assert calls == [0, 1, 2]  # each layer computed once
  got = params_io.load_params(tmp_path / "p")
  np.testing.assert_array_equal(got["layers"]["k"], stacked)
  assert got["rows"].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(got["rows"], rows)
  np.testing.assert_array_equal(got["cols"], cols)
  np.testing.assert_array_equal(got["whole"], cols)
  assert float(got["scalar"]) == 3.5
  np.testing.assert_array_equal(got["plain"], np.arange(6))

  reader = params_io.ParamsReader(tmp_path / "p")
  assert reader.info(("layers", "k")).chunk_shape[0] == 1
  for i in (2, 0, 1):
    np.testing.assert_array_equal(reader.read(("layers", "k"), i), stacked[i])
  np.testing.assert_array_equal(reader.read(("cols",)), cols)
  with pytest.raises(params_io.ParamsIOError, match="no parameter nope"):
    reader.read(("nope",))


def test_reader_bands_over_arrays_chunked_across_layers(tmp_path):
  """A plain save (one chunk per array, as from a single device) is read band by band."""
  x = np.random.default_rng(1).standard_normal((5, 3, 2)).astype(np.float32)
  params_io.save_params(tmp_path / "p", {"layers": {"w": x}})
  reader = params_io.ParamsReader(tmp_path / "p")
  assert reader.info(("layers", "w")).chunk_shape[0] == 5
  for i in (0, 1, 4, 2):
    np.testing.assert_array_equal(reader.read(("layers", "w"), i), x[i])


def test_resolve_and_errors(tmp_path):
  x = {"a": np.ones(3, np.float32)}
  params_io.save_params(tmp_path / "run" / "7", x)
  params_io.save_params(tmp_path / "run" / "12", {"a": np.zeros(3, np.float32)})
  assert params_io.resolve_params_dir(str(tmp_path / "run")).endswith("/12/params")  # latest step
  assert params_io.resolve_params_dir(str(tmp_path / "run" / "7" / "params")).endswith("/7/params")
  with pytest.raises(params_io.ParamsIOError, match="not a params checkpoint"):
    params_io.resolve_params_dir(str(tmp_path))
  with pytest.raises(params_io.ParamsIOError, match="no such directory"):
    params_io.load_params(str(tmp_path / "missing"))
  bad = {"a": params_io.LazyArray.per_layer((2, 3), np.float32, lambda i: np.zeros(4, np.float32))}
  with pytest.raises(Exception, match="expected"):
    params_io.save_params(tmp_path / "bad", bad)
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  got = params_io.load_params(str(tmp_path / "run"), {"a": jax.ShapeDtypeStruct((3,), np.float32, sharding=dev)})
  assert isinstance(got["a"], jax.Array) and not np.asarray(got["a"]).any()


def test_reader_band_budget_splits_wide_chunks(tmp_path):
  """With a band budget smaller than a chunk, bands are budget-sized and every slice is right."""
  x = np.random.default_rng(2).standard_normal((7, 4, 3)).astype(np.float32)
  params_io.save_params(tmp_path / "p", {"w": x})
  reader = params_io.ParamsReader(tmp_path / "p", band_bytes=2 * 4 * 3 * 4)  # two layer slices
  for i in range(7):
    np.testing.assert_array_equal(reader.read(("w",), i), x[i])
    assert reader._band[2] - reader._band[1] <= 2  # pylint: disable=protected-access
  np.testing.assert_array_equal(reader.read(("w",), 3), x[3])


def test_lazy_writer_layout_matches_orbax_numpy_handler(tmp_path):
  """The one convention copied from Orbax's NumpyHandler (params_io._ocdbt_process_index: which OCDBT
  process subdirectory a leaf is written under) must still be Orbax's: the files written for a
  LazyArray leaf and by the stock StandardCheckpointer for the same numpy leaf have the same layout
  and metadata. Fails loudly if an Orbax upgrade changes it."""
  x = np.arange(24, dtype=np.float32).reshape(4, 6)
  params_io.save_params(tmp_path / "lazy", {"a": params_io.LazyArray.computed(x.shape, x.dtype, lambda: x)})
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / "stock" / "params", {"a": x})

  def layout(d):
    files = [os.path.relpath(os.path.join(r, f), d) for r, _, fs in os.walk(d) for f in fs]
    return sorted(re.sub(r"[0-9a-f]{32}", "<hash>", f) for f in files)
  lazy, stock = tmp_path / "lazy" / "params", tmp_path / "stock" / "params"
  assert layout(lazy) == layout(stock)
  assert any(p.startswith(f"ocdbt.process_{jax.process_index()}/") for p in layout(lazy))
  meta = lambda d: json.loads((d / "_METADATA").read_text())["tree_metadata"]
  assert meta(lazy) == meta(stock)
  np.testing.assert_array_equal(params_io.load_params(tmp_path / "lazy")["a"], x)
