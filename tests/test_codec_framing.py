"""X-Codec framing as the reference: trim to floor(n / 320) * 320 samples, floor(n / 320) frames.

Independent references: the frame counts and codes come from `transformers.XcodecModel` itself (the
tiny random codec of `codec.build_tiny_xcodec`) run on the trimmed waveform, for every remainder
class n mod 320 in 0..319.
"""

from __future__ import annotations

import numpy as np
import pytest

from bagpiper_jax import codec

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  return codec.XCodec(codec.build_tiny_xcodec(str(tmp_path_factory.mktemp("xcodec")), seed=0), num_threads=1)


def _model_codes(c: codec.XCodec, wav: np.ndarray) -> np.ndarray:
  """The codec model's own output [T, 8] on exactly `wav` (no trimming)."""
  with torch.inference_mode():
    out = c.model.encode(torch.from_numpy(np.ascontiguousarray(wav))[None, None], bandwidth=c._bandwidth,
                         return_dict=False)
  return out[0].T.numpy()


def test_every_remainder_class_gives_floor_frames_and_the_trimmed_codes(tiny):
  x = (0.2 * np.random.default_rng(0).standard_normal(3 * 320 + 320)).astype(np.float32)
  frames = {1: None, 2: None, 3: None}
  for k in frames:  # the codec's output on k * 320 samples: k frames, by the codec itself
    frames[k] = _model_codes(tiny, x[: k * 320])
    assert frames[k].shape == (k, 8)
  extra = 0
  for r in range(320):
    k = 1 + r % 3  # cover several lengths per remainder
    n = k * 320 + r
    got = tiny.encode(x[:n])
    assert got.shape == (n // 320, 8) == (k, 8), (n, got.shape)
    np.testing.assert_array_equal(got, frames[k], err_msg=f"n={n}")
    if r and r % 40 == 0:  # what trimming prevents: the untrimmed clip's frame count
      extra += _model_codes(tiny, x[:n]).shape[0] - k
  assert extra > 0  # the untrimmed waveform does get an extra frame for some remainders


def test_too_short_and_helpers(tiny):
  with pytest.raises(codec.CodecError, match="shorter than one codec frame"):
    tiny.encode(np.zeros(319, np.float32))
  assert codec.num_frames(19_752) == 61 and codec.num_frames(320) == 1 and codec.num_frames(319) == 0
  assert codec.trim_to_frames(np.zeros(19_752)).shape == (19_520,)
