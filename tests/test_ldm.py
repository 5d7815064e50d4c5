"""LDM pre-training: LDM's epsilon objective, LitEma, the compiled step learns, the export round
trip."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import synthetic
from midms_jax import ldm
from midms_jax.models import build
from midms_jax.midms.model import MIDMs


@pytest.fixture(scope="module")
def setup():
  config = synthetic.get_config("ldm")
  config.ldm.batch_size = 4
  model = MIDMs.from_config(config)
  unet = build.build_unet(config.model.unet)
  variables = dict(
      unet=jax.jit(unet.init)(
          jax.random.PRNGKey(0),
          *(jnp.zeros(x.shape, x.dtype) for x in build.unet_inputs(config.model.unet)),
      )
  )
  images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 32, 32, 3)), jnp.float32)
  return config, model, variables, images


def test_ema_decay_follows_litema_warmup():
  # LitEma: decay = min(decay, (1 + n) / (10 + n)) with n the update count after incrementing.
  assert float(ldm.ema_decay(0.9999, 1)) == pytest.approx(2 / 11)
  assert float(ldm.ema_decay(0.9999, 90)) == pytest.approx(91 / 100)
  assert float(ldm.ema_decay(0.999, 100_000)) == pytest.approx(0.999)
  ema = ldm.ema_update({"w": jnp.float32(1.0)}, {"w": jnp.float32(3.0)}, jnp.float32(0.75))
  assert float(ema["w"]) == pytest.approx(1.0 - 0.25 * (1.0 - 3.0))


def test_eps_loss_is_mse_on_the_noise_of_q_sample(setup):
  config, model, variables, images = setup
  latents = model.encode({"first_stage": {}}, images)
  rng = jax.random.PRNGKey(3)
  t_key, noise_key = jax.random.split(rng)
  t = jax.random.randint(t_key, (4,), 0, config.diffusion.timesteps)
  noise = jax.random.normal(noise_key, latents.shape)
  ac = np.asarray(model.schedule.alphas_cumprod)[np.asarray(t)][:, None, None, None]
  x_t = np.sqrt(ac) * np.asarray(latents) + np.sqrt(1 - ac) * np.asarray(noise)
  eps = jax.jit(model.unet.apply)(variables["unet"], jnp.asarray(x_t, jnp.float32), t)
  want = np.mean((np.asarray(noise) - np.asarray(eps)) ** 2)
  got = jax.jit(lambda params: ldm.eps_loss(model, params, latents, rng))(
      variables["unet"]["params"]
  )
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_max_timestep_limits_the_training_timesteps(setup):
  """``max_timestep`` draws t from [0, max): the loss equals the formula with that bound (the same
  key over all 1000 timesteps draws other timesteps, so an ignored bound fails the comparison)."""
  config, model, variables, images = setup
  latents = model.encode({"first_stage": {}}, images)
  rng = jax.random.PRNGKey(3)
  t_key, noise_key = jax.random.split(rng)
  t = jax.random.randint(t_key, (4,), 0, 20)
  assert int(jnp.max(t)) < 20
  noise = jax.random.normal(noise_key, latents.shape)
  ac = np.asarray(model.schedule.alphas_cumprod)[np.asarray(t)][:, None, None, None]
  x_t = np.sqrt(ac) * np.asarray(latents) + np.sqrt(1 - ac) * np.asarray(noise)
  # A U-Net whose output depends on its input (a fresh one's zero-initialised last convolution
  # outputs 0).
  leaves, tree = jax.tree_util.tree_flatten(variables["unet"]["params"])
  keys = jax.random.split(jax.random.PRNGKey(5), len(leaves))
  params = tree.unflatten(
      [leaf + 0.05 * jax.random.normal(key, leaf.shape) for leaf, key in zip(leaves, keys)]
  )
  eps = jax.jit(model.unet.apply)({"params": params}, jnp.asarray(x_t, jnp.float32), t)
  want = np.mean((np.asarray(noise) - np.asarray(eps)) ** 2)
  assert not np.array_equal(t, jax.random.randint(t_key, (4,), 0, config.diffusion.timesteps))
  got = jax.jit(lambda params: ldm.eps_loss(model, params, latents, rng, 20))(params)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  with pytest.raises(ValueError, match=r"ldm.max_timestep must be in \[0, 1000\]"):
    ldm.eps_loss(model, params, latents, rng, 1001)


def test_preview_must_be_a_trained_timestep(setup):
  config, model, _, _ = setup
  config = config.copy_and_resolve_references()
  config.ldm.max_timestep, config.ldm.preview_t = 200, 500
  with pytest.raises(
      ValueError, match=r"ldm.preview_t=500 must be a trained timestep, in \[0, 200\)"
  ):
    ldm.make_step(model, config)


def test_compiled_step_learns_and_keeps_the_ema_behind(setup):
  config, model, variables, images = setup
  config = config.copy_and_resolve_references()
  config.ldm.lr = 1e-3
  # the step donates its state
  params = jax.tree_util.tree_map(jnp.copy, variables["unet"]["params"])
  state = ldm.create_state(params, ldm.make_optimizer(config.ldm))
  step = ldm.make_step(model, config)
  frozen = dict(first_stage={})
  latents = model.encode({"first_stage": {}}, images)
  fixed = jax.jit(lambda params: ldm.eps_loss(model, params, latents, jax.random.PRNGKey(7)))
  start = float(fixed(state.params))
  first_params = jax.tree_util.tree_map(jnp.copy, state.params)
  for _ in range(15):
    state, metrics = step(state, frozen, {"image": images})
  assert (
      int(state.step) == 15
      and np.isfinite(float(metrics["loss_total"]))
      and bool(metrics["finite"])
  )
  assert float(fixed(state.params)) < 0.8 * start
  # The EMA moved from the initial weights towards the trained ones, but not all the way.
  leaf = lambda tree: jax.tree_util.tree_leaves(tree)[0]
  moved, total = float(jnp.sum(jnp.abs(leaf(state.ema_params) - leaf(first_params)))), float(
      jnp.sum(jnp.abs(leaf(state.params) - leaf(first_params)))
  )
  assert 0 < moved < total


def test_export_round_trip_gives_the_ema_unet(setup, tmp_path):
  from midms_jax.interop import torch_export, torch_import  # pylint: disable=import-outside-toplevel

  config, _, variables, _ = setup
  state = ldm.create_state(variables["unet"]["params"], ldm.make_optimizer(config.ldm))
  ema = jax.tree_util.tree_map(lambda x: x + 1.0, state.ema_params)
  state = state.replace(ema_params=ema, step=jnp.asarray(12, jnp.int32))
  exported = ldm.exported_variables(state, {}, config.ldm.ema_decay)
  path = torch_export.save_safetensors(
      tmp_path / "ldm.safetensors", torch_export.ldm_state_dict(exported, config)
  )
  for use_ema, want in ((True, ema), (False, state.params)):
    loaded = torch_import.load_ldm_checkpoint(path, config.model, use_ema=use_ema)
    for a, b in zip(
        jax.tree_util.tree_leaves(loaded["unet"]["params"]), jax.tree_util.tree_leaves(want)
    ):
      np.testing.assert_array_equal(a, b)


def test_the_step_reports_a_non_finite_state(setup):
  """The finiteness report the training loop reads (issue 22): one NaN in the EMA shadows is
  enough."""
  config, model, variables, images = setup
  params = jax.tree_util.tree_map(jnp.copy, variables["unet"]["params"])
  state = ldm.create_state(params, ldm.make_optimizer(config.ldm))
  ema = jax.tree_util.tree_map(
      lambda x: x.at[(0,) * x.ndim].set(jnp.nan) if x.ndim else x, state.ema_params
  )
  _, metrics = ldm.make_step(model, config)(
      state.replace(ema_params=ema), dict(first_stage={}), {"image": images}
  )
  assert np.isfinite(float(metrics["loss_total"])) and not bool(metrics["finite"])
