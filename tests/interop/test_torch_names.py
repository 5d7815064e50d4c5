"""The mechanical Flax <-> PyTorch mapping: names, layouts, strictness, round trip."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from midms_jax.errors import CheckpointError
from midms_jax.interop import torch_names

torch = pytest.importorskip("torch")


class _Tiny(nn.Module):
  """Conv2d, Conv1d-as-1-wide-conv, Linear and GroupNorm-style params under PyTorch-like names."""

  @nn.compact
  def __call__(self, x):
    h = nn.Conv(5, (3, 3), padding=((1, 1), (1, 1)), name="body.0")(x)
    seq = h.reshape(h.shape[0], -1, 5)
    seq = nn.Conv(6, (1,), name="qkv")(seq)
    pooled = seq.mean(axis=1)
    scale = self.param("scale", nn.initializers.ones, (4,))
    return nn.Dense(4, name="head.2")(pooled) * scale


def _torch_tiny(state: dict[str, np.ndarray], x_nchw: np.ndarray) -> np.ndarray:
  t = {k: torch.tensor(np.asarray(v)) for k, v in state.items()}
  h = torch.nn.functional.conv2d(
      torch.from_numpy(x_nchw), t["body.0.weight"], t["body.0.bias"], padding=1
  )
  # (B, C, T) as torch Conv1d sees it
  seq = h.permute(0, 2, 3, 1).reshape(h.shape[0], -1, 5).transpose(1, 2)
  seq = torch.nn.functional.conv1d(seq, t["qkv.weight"], t["qkv.bias"])
  out = (
      torch.nn.functional.linear(seq.mean(dim=2), t["head.2.weight"], t["head.2.bias"])
      * t["weight"]
  )
  return out.numpy()


def test_keys_layouts_and_round_trip():
  x = np.random.default_rng(0).normal(size=(2, 4, 4, 3)).astype(np.float32)
  variables = _Tiny().init(jax.random.PRNGKey(1), x)
  state = torch_names.state_dict_from_variables(variables)
  assert {k: v.shape for k, v in state.items()} == {
      "body.0.weight": (5, 3, 3, 3),
      "body.0.bias": (5,),
      "qkv.weight": (6, 5, 1),
      "qkv.bias": (6,),
      "head.2.weight": (4, 6),
      "head.2.bias": (4,),
      "weight": (4,),
  }
  expected = _torch_tiny(state, np.transpose(x, (0, 3, 1, 2)))
  np.testing.assert_allclose(_Tiny().apply(variables, x), expected, rtol=1e-5, atol=1e-5)

  abstract = jax.eval_shape(_Tiny().init, jax.random.PRNGKey(0), x)
  assert torch_names.expected_torch_keys(abstract) == {k: v.shape for k, v in state.items()}
  restored, consumed = torch_names.variables_from_state_dict(state, abstract)
  assert consumed == set(state)
  jax.tree_util.tree_map(
      np.testing.assert_array_equal, restored, jax.tree_util.tree_map(np.asarray, variables)
  )


def test_missing_and_mismatched_keys_are_listed():
  abstract = jax.eval_shape(_Tiny().init, jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 3)))
  state = torch_names.state_dict_from_variables(
      _Tiny().init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 3)))
  )
  with pytest.raises(
      CheckpointError, match=r"^f\.pth: 1 key\(s\) missing for this config: qkv\.bias$"
  ):
    torch_names.variables_from_state_dict(
        {k: v for k, v in state.items() if k != "qkv.bias"}, abstract, source="f.pth"
    )
  state["body.0.weight"] = np.zeros((5, 4, 3, 3), np.float32)
  with pytest.raises(
      CheckpointError,
      match=r"body\.0\.weight has shape \(5, 4, 3, 3\), model expects \(5, 3, 3, 3\)",
  ):
    torch_names.variables_from_state_dict(state, abstract, source="f.pth")


def test_reject_unexpected_honours_ignorable_prefixes():
  torch_names.reject_unexpected(["a.w", "loss.x"], {"a.w"}, ("loss.",), source="f")
  with pytest.raises(CheckpointError, match=r"^f: 1 unexpected key\(s\) for this config: b\.w$"):
    torch_names.reject_unexpected(["a.w", "b.w", "loss.x"], {"a.w"}, ("loss.",), source="f")
