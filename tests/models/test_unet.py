"""LDM U-Net vs the official PyTorch outputs (unet_io.npz, small config), EMA loading, full-size
shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from midms_jax.errors import CheckpointError
from midms_jax.interop.ldm_ema import ema_state_dict
from midms_jax.interop.torch_names import expected_torch_keys, variables_from_state_dict
from midms_jax.models.unet import UNetModel, timestep_embedding
from tests.conftest import assert_close, load_fixture, nchw_to_nhwc, nhwc_to_nchw

PREFIX = "diff_model.model.diffusion_model."
EMA_PREFIX, MODEL_PREFIX = "diff_model.model_ema.", "diff_model.model."
# unet_config of ldm_small_config.yaml.
SMALL = dict(
    image_size=8,
    in_channels=3,
    out_channels=3,
    model_channels=32,
    attention_resolutions=(2,),
    num_res_blocks=1,
    channel_mult=(1, 2),
    num_head_channels=16,
)
CHURCHES = dict(
    image_size=32,
    in_channels=4,
    out_channels=4,
    model_channels=192,
    attention_resolutions=(1, 2, 4, 8),
    num_res_blocks=2,
    channel_mult=(1, 2, 2, 4, 4),
    num_heads=8,
    num_head_channels=-1,
    use_scale_shift_norm=True,
    resblock_updown=True,
)
BLOCKS = (
    "input_blocks.0",
    "input_blocks.1",
    "input_blocks.2",
    "input_blocks.3",
    "middle_block",
    "output_blocks.0",
    "output_blocks.1",
    "output_blocks.2",
    "output_blocks.3",
)
# Absolute tolerances from the fixture README.
TOLERANCES = {
    "eps": 2e-5,
    "eps2": 2e-5,
    "eps_ema": 2e-5,
    "t_emb_sinusoidal": 1e-6,
    "t2_emb_sinusoidal": 1e-6,
    "time_embed_out": 2e-6,
    "blocks/middle_block": 5e-5,
    **{f"blocks/input_blocks.{i}": 2e-5 for i in range(4)},
    **{f"blocks/output_blocks.{i}": 5e-5 for i in range(4)},
}


def _abstract(model: UNetModel):
  x = jax.ShapeDtypeStruct((1, model.image_size, model.image_size, model.in_channels), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), x, jax.ShapeDtypeStruct((1,), jnp.int32))


def _param_count(abstract_variables) -> int:
  return sum(
      int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(abstract_variables["params"])
  )


@pytest.fixture(scope="module")
def unet_io():
  return load_fixture("unet_io.npz")


@pytest.fixture(scope="module")
def small_unet():
  return UNetModel(**SMALL)


@pytest.fixture(scope="module")
def run_small(small_unet):
  """jit-compiled apply returning (eps NCHW, {block or time_embed.2: output NCHW / (B, D)})."""
  capture = lambda module, method: module.name in BLOCKS + ("time_embed.2",)

  @jax.jit
  def run(variables, x, t):
    return small_unet.apply(
        variables, x, t, capture_intermediates=capture, mutable=["intermediates"]
    )

  def call(variables, x_nchw, t):
    eps, state = run(variables, nchw_to_nhwc(x_nchw), t)
    outputs = {name: value["__call__"][0] for name, value in state["intermediates"].items()}
    return nhwc_to_nchw(eps), outputs

  return call


def _load(state_dict, model):
  variables, _ = variables_from_state_dict(
      state_dict, _abstract(model), prefix=PREFIX, source="midms_small.pth"
  )
  return variables


def test_timestep_embedding(unet_io):
  for t_key, emb_key in (("t", "t_emb_sinusoidal"), ("t2", "t2_emb_sinusoidal")):
    assert_close(
        timestep_embedding(unet_io[t_key], 32), unet_io[emb_key], TOLERANCES[emb_key], emb_key
    )


def test_timestep_embedding_odd_dim_pads_zero():
  emb = timestep_embedding(jnp.array([3, 500]), 7)
  assert emb.shape == (2, 7) and emb.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(emb[:, -1]), 0.0)


def test_small_keys_match_checkpoint(midms_state_dict, small_unet):
  expected = expected_torch_keys(_abstract(small_unet), PREFIX)
  actual = {k: tuple(v.shape) for k, v in midms_state_dict.items() if k.startswith(PREFIX)}
  assert set(expected) == set(actual)
  assert expected == actual


def test_small_forward_matches_official(midms_state_dict, small_unet, run_small, unet_io):
  variables = _load(midms_state_dict, small_unet)
  eps, blocks = run_small(variables, unet_io["x"], unet_io["t"])
  assert_close(eps, unet_io["eps"], TOLERANCES["eps"], "eps")
  assert_close(
      blocks["time_embed.2"],
      unet_io["time_embed_out"],
      TOLERANCES["time_embed_out"],
      "time_embed_out",
  )
  for name in BLOCKS:
    key = f"blocks/{name}"
    assert_close(nhwc_to_nchw(blocks[name]), unet_io[key], TOLERANCES[key], key)
  eps2, _ = run_small(variables, unet_io["x2"], unet_io["t2"])
  assert_close(eps2, unet_io["eps2"], TOLERANCES["eps2"], "eps2")


def test_chunked_attention_matches_official(midms_state_dict, unet_io):
  """attention_chunk: the small U-Net's attention runs at 4x4 = 16 tokens; blocks of 3 queries (the
  last one partial) give the official eps, and the same eps and parameter gradients as all queries
  at once.
  """
  whole, chunked = UNetModel(**SMALL), UNetModel(**SMALL, attention_chunk=3)
  variables = _load(midms_state_dict, whole)
  x = nchw_to_nhwc(unet_io["x"])
  eps = jax.jit(chunked.apply)(variables, x, unet_io["t"])
  assert_close(nhwc_to_nchw(eps), unet_io["eps"], TOLERANCES["eps"], "eps (chunked attention)")
  grad = lambda model: jax.jit(
      jax.grad(lambda v: jnp.sum(jnp.sin(model.apply(v, x, unet_io["t"]))))
  )(variables)
  flat_whole, flat_chunked = (
      jax.tree_util.tree_leaves_with_path(grad(m)) for m in (whole, chunked)
  )
  # One scale for all: some gradients are rounding noise around 0 (a key bias shifts every score of
  # a query alike).
  scale = max(float(jnp.max(jnp.abs(g))) for _, g in flat_whole)
  for (path, g_whole), (_, g_chunked) in zip(flat_whole, flat_chunked):
    np.testing.assert_allclose(
        g_chunked, g_whole, atol=1e-6 * scale, err_msg=jax.tree_util.keystr(path)
    )
  text = jax.jit(chunked.apply).lower(variables, x, unet_io["t"]).as_text()
  assert "stablehlo.while" in text  # the blocks run one after the other


def test_bfloat16_computation(midms_state_dict, unet_io):
  """dtype=bfloat16 computes in bf16 from float32 params and returns float32 eps close to the
  official one."""
  model = UNetModel(**SMALL, dtype=jnp.bfloat16)
  abstract = _abstract(model)
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(abstract)} == {jnp.dtype(jnp.float32)}
  eps = jax.jit(model.apply)(
      _load(midms_state_dict, model), nchw_to_nhwc(unet_io["x"]), unet_io["t"]
  )
  assert eps.dtype == jnp.float32
  # bf16 has 8 mantissa bits: a few 1e-2 on |eps| ~ 1 (float32 gives ~1e-6).
  assert_close(nhwc_to_nchw(eps), unet_io["eps"], 5e-2, "eps (bfloat16)")


def test_ema_weights_reproduce_eps_ema(midms_state_dict, small_unet, run_small, unet_io):
  ema = ema_state_dict(midms_state_dict, ema_prefix=EMA_PREFIX, model_prefix=MODEL_PREFIX)
  bias = PREFIX + "input_blocks.1.0.in_layers.0.bias"
  np.testing.assert_array_equal(
      ema[bias], midms_state_dict[EMA_PREFIX + "diffusion_modelinput_blocks10in_layers0bias"]
  )
  assert not np.array_equal(ema[bias], midms_state_dict[bias])
  eps_ema, _ = run_small(_load(ema, small_unet), unet_io["x"], unet_io["t"])
  assert_close(eps_ema, unet_io["eps_ema"], TOLERANCES["eps_ema"], "eps_ema")
  # The EMA result is clearly distinct from the raw weights' result.
  assert np.max(np.abs(unet_io["eps_ema"] - unet_io["eps"])) > 100 * TOLERANCES["eps_ema"]


def test_ema_missing_shadow_raises(midms_state_dict):
  state = dict(midms_state_dict)
  del state[EMA_PREFIX + "diffusion_modelout2weight"]
  with pytest.raises(CheckpointError, match="^ckpt.pth: 1 of .*diffusion_modelout2weight"):
    ema_state_dict(state, ema_prefix=EMA_PREFIX, model_prefix=MODEL_PREFIX, source="ckpt.pth")


def test_full_size_celeba_shapes():
  abstract = _abstract(UNetModel())
  assert _param_count(abstract) == 274_056_163
  keys = expected_torch_keys(abstract)
  assert len(keys) == 368
  assert keys["input_blocks.0.0.weight"] == (224, 3, 3, 3)
  assert keys["input_blocks.1.0.emb_layers.1.weight"] == (224, 896)
  assert keys["input_blocks.3.0.op.weight"] == (224, 224, 3, 3)
  assert keys["input_blocks.4.0.skip_connection.weight"] == (448, 224, 1, 1)
  assert keys["input_blocks.4.1.qkv.weight"] == (1344, 448, 1)
  assert keys["input_blocks.4.1.proj_out.weight"] == (448, 448, 1)
  assert keys["middle_block.1.qkv.weight"] == (2688, 896, 1)
  assert keys["output_blocks.2.2.conv.weight"] == (896, 896, 3, 3)
  assert keys["time_embed.0.weight"] == (896, 224) and keys["time_embed.2.weight"] == (896, 896)
  assert keys["out.0.weight"] == (224,) and keys["out.2.weight"] == (3, 224, 3, 3)


def test_full_size_lsun_churches_shapes():
  abstract = _abstract(UNetModel(**CHURCHES))
  assert _param_count(abstract) == 294_966_916  # = the official PyTorch model's parameter count
  keys = expected_torch_keys(abstract)
  assert len(keys) == 520
  # Scale-shift norm: the embedding projection yields 2 * C.
  assert keys["input_blocks.1.0.emb_layers.1.weight"] == (384, 768)
  # resblock_updown: the down/up-sampling layers are ResBlocks, no conv op.
  assert keys["input_blocks.3.0.in_layers.2.weight"] == (192, 192, 3, 3)
  assert not any(k.endswith(".op.weight") or k.endswith(".conv.weight") for k in keys)
  assert keys["output_blocks.2.1.out_layers.3.weight"] == (768, 768, 3, 3)  # no attention at 1/16
  # up ResBlock after the 1/8 attention
  assert keys["output_blocks.5.2.emb_layers.1.weight"] == (
      1536,
      768,
  )
  # Attention at 1/1 .. 1/8, none at 1/16 (the innermost level).
  assert keys["input_blocks.1.1.qkv.weight"] == (576, 192, 1)
  assert "input_blocks.13.1.qkv.weight" not in keys
  assert keys["middle_block.1.qkv.weight"] == (2304, 768, 1)


def test_scale_shift_updown_new_order_runs():
  model = UNetModel(
      image_size=8,
      in_channels=4,
      out_channels=4,
      model_channels=32,
      num_res_blocks=1,
      attention_resolutions=(1, 2),
      channel_mult=(1, 2),
      num_heads=4,
      num_head_channels=-1,
      use_scale_shift_norm=True,
      resblock_updown=True,
      use_new_attention_order=True,
      dropout=0.1,
  )
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
  t = jnp.array([999, 3])
  # Random weights everywhere (out.2 / out_layers.3 / proj_out start at zero, as the official
  # zero_module).
  abstract = jax.eval_shape(model.init, jax.random.key(0), x, t)
  rng = np.random.default_rng(0)
  variables = jax.tree_util.tree_map(
      lambda v: (0.3 * rng.standard_normal(v.shape) + (v.ndim == 1)).astype(np.float32), abstract
  )
  apply = jax.jit(model.apply, static_argnames="train")
  eps = apply(variables, x, t)
  eps_train = apply(variables, x, t, train=True, rngs={"dropout": jax.random.key(3)})
  assert eps.shape == (2, 8, 8, 4) and eps.dtype == jnp.float32
  assert np.all(np.isfinite(eps)) and np.all(np.isfinite(eps_train))
  assert np.std(np.asarray(eps)) > 0
  assert not np.allclose(eps, eps_train)


def test_heads_unset_raises():
  model = UNetModel(**{**SMALL, "num_head_channels": -1, "num_heads": -1})
  with pytest.raises(ValueError, match="num_heads"):
    _abstract(model)
