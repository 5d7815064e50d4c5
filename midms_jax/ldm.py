"""LDM pre-training (``config.stage = "ldm"``): the U-Net learns to predict the noise of first-stage
latents.

MIDMs fine-tunes a pretrained latent diffusion model; for a data set without one this stage trains
it, with LDM's own objective (``LatentDiffusion.p_losses``, epsilon parameterisation,
``l_simple_weight`` 1 and no ELBO term): ``t`` uniform in ``[0, T)``,
``x_t = sqrt(ā_t) z + sqrt(1 - ā_t) ε`` with ``z`` the frozen first stage's latent of a training
image (``MIDMs.encode``: the latent space the MIDMs stage works in), loss
``mean((ε - unet(x_t, t))²)``, AdamW (torch's defaults, as LDM's ``configure_optimizers``) and an
exponential moving average of the U-Net with LDM's ``LitEma`` warm-up,
``decay_k = min(decay, (1 + k) / (10 + k))`` at update ``k`` (1-based).

``LDMState`` holds the step, the U-Net parameters, their EMA and the optimiser state; the first
stage is passed separately as ``frozen``. Per-step randomness is ``fold_in(PRNGKey(seed), step)``.
The step is ``jax.jit`` over the same (``data``, ``fsdp``) mesh as the MIDMs stage.
"""

from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from midms_jax import sharding, train_step as midms_train_step
from midms_jax.data import images as images_lib
from midms_jax.diffusion.ddim import predict_x0, q_sample
from midms_jax.midms.model import MIDMs

LATENT_KEY = (
    "latent"  # a batch's cached first-stage latents (midms_jax.latent_cache), in place of "image"
)


@flax.struct.dataclass
class LDMState:
  step: jax.Array
  params: Any  # the U-Net's ``params`` collection
  ema_params: Any  # its exponential moving average (LitEma's shadow)
  opt_state: Any


def make_optimizer(ldm_cfg) -> optax.GradientTransformation:
  """AdamW at a constant ``ldm.lr`` (LDM: torch.optim.AdamW with its default betas, eps and weight
  decay)."""
  return optax.adamw(
      ldm_cfg.lr,
      b1=ldm_cfg.adam_b1,
      b2=ldm_cfg.adam_b2,
      eps=ldm_cfg.adam_eps,
      weight_decay=ldm_cfg.weight_decay,
  )


def create_state(unet_params: Any, tx: optax.GradientTransformation) -> LDMState:
  return LDMState(
      step=jnp.zeros((), jnp.int32),
      params=unet_params,
      ema_params=jax.tree_util.tree_map(jnp.copy, unet_params),
      opt_state=tx.init(unet_params),
  )


def ema_decay(decay: float, num_updates: jax.Array) -> jax.Array:
  """LitEma's decay at (1-based) update ``num_updates``: ``min(decay, (1 + n) / (10 + n))``."""
  n = jnp.asarray(num_updates, jnp.float32)
  return jnp.minimum(jnp.float32(decay), (1 + n) / (10 + n))


def ema_update(ema: Any, params: Any, decay: jax.Array) -> Any:
  """``shadow -= (1 - decay) * (shadow - param)`` for every leaf (LitEma.forward)."""
  return jax.tree_util.tree_map(lambda s, p: s - (1 - decay) * (s - p), ema, params)


def _levels(model: MIDMs, t: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(sqrt(ā_t), sqrt(1 - ā_t))`` per sample, shaped to broadcast over NHWC latents."""
  at = lambda table: jnp.asarray(table)[t][:, None, None, None]
  return at(model.schedule.sqrt_alphas_cumprod), at(model.schedule.sqrt_one_minus_alphas_cumprod)


def noised(model: MIDMs, latents: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """``q_sample``: ``sqrt(ā_t) z + sqrt(1 - ā_t) ε`` per sample."""
  return q_sample(latents, *_levels(model, t), noise)


def predicted_x0(model: MIDMs, x_t: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
  """``(x_t - sqrt(1 - ā_t) ε̂) / sqrt(ā_t)``: the clean latent the predicted noise implies."""
  return predict_x0(x_t, eps, *_levels(model, t))


def _unet(model: MIDMs, params: Any, x: jax.Array, t: jax.Array) -> jax.Array:
  return model.unet.apply({"params": params}, x, t).astype(jnp.float32)


def timestep_limit(model: MIDMs, max_timestep: int) -> int:
  """The exclusive upper bound of the training timesteps: ``ldm.max_timestep``, or all of them
  when 0."""
  num = model.schedule.num_timesteps
  if not 0 <= max_timestep <= num:
    raise ValueError(
        f"ldm.max_timestep must be in [0, {num}] (0: all timesteps), got {max_timestep}"
    )
  return max_timestep or num


def eps_loss(
    model: MIDMs, params: Any, latents: jax.Array, rng: jax.Array, max_timestep: int = 0
) -> jax.Array:
  """LDM's simple loss on one batch of clean latents: ``t`` uniform in ``[0, max_timestep)`` (0: all
  timesteps, LDM's objective), Gaussian ``ε``, MSE on ``ε``."""
  t_key, noise_key = jax.random.split(rng)
  t = jax.random.randint(t_key, (latents.shape[0],), 0, timestep_limit(model, max_timestep))
  noise = jax.random.normal(noise_key, latents.shape, jnp.float32)
  eps = _unet(model, params, noised(model, latents, t, noise), t)
  return jnp.mean(jnp.square(noise - eps))


def state_shardings(state: LDMState, mesh: Mesh) -> LDMState:
  """As ``train_step.state_shardings``: parameters, their EMA and the AdamW moments split by
  ``sharding.fsdp_spec``."""
  split = lambda tree: sharding.split_shardings(tree, mesh)
  return LDMState(
      step=sharding.replicated(mesh),
      params=split(state.params),
      ema_params=split(state.ema_params),
      opt_state=split(state.opt_state),
  )


def batch_latents(model: MIDMs, frozen, batch, rng: jax.Array) -> jax.Array:
  """The batch's first-stage latents: cached (``batch[LATENT_KEY]``, ``midms_jax.latent_cache``) or
  encoded."""
  if LATENT_KEY in batch:
    return batch[LATENT_KEY]
  return model.encode({"first_stage": frozen["first_stage"]}, batch["image"], rng)


def make_step(
    model: MIDMs, config, mesh: Mesh | None = None, state_sharding: Any = None
) -> Callable:
  """``step(state, frozen, batch) -> (state, metrics)``, state donated;
  ``frozen = {'first_stage': ...}``, ``batch['image']`` the training images, or ``batch['latent']``
  their cached latents (``latent_cache``). Sharding as ``train_step.make_train_steps``."""
  ldm_cfg = config.ldm
  limit = timestep_limit(model, ldm_cfg.max_timestep)
  if not 0 <= ldm_cfg.preview_t < limit:
    raise ValueError(
        f"ldm.preview_t={ldm_cfg.preview_t} must be a trained timestep, in [0, {limit})"
    )
  tx = make_optimizer(ldm_cfg)
  seed = config.train.seed

  def step(state: LDMState, frozen, batch):
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), state.step)
    encode_key, loss_key = jax.random.split(rng)
    latents = batch_latents(model, frozen, batch, encode_key)
    loss, grads = jax.value_and_grad(
        lambda p: eps_loss(
            model, sharding.whole_parameters(p, mesh), latents, loss_key, ldm_cfg.max_timestep
        )
    )(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay(ldm_cfg.ema_decay, state.step + 1)
    state = LDMState(
        step=state.step + 1,
        params=params,
        ema_params=ema_update(state.ema_params, params, decay),
        opt_state=opt_state,
    )
    grad_norm = optax.tree.norm(grads)
    return state, dict(
        loss_total=loss,
        loss_eps=loss,
        grad_norm=grad_norm,
        ema_decay=decay,
        learning_rate=jnp.float32(ldm_cfg.lr),
        finite=midms_train_step.all_finite(loss, grad_norm, state.params, state.ema_params),
    )

  return sharding.jit_step(step, mesh, state_sharding)


def make_preview(model: MIDMs, t: int) -> Callable:
  """``preview(state, frozen, batch) -> {'image', 'noisy', 'denoised'}``: the batch's images
  (decoded from ``batch['latent']`` when cached), each latent noised to step ``t`` (fixed noise) and
  the EMA U-Net's one-step estimate of the clean image, decoded (for the image log)."""

  def preview(state: LDMState, frozen, batch):
    variables = {"first_stage": frozen["first_stage"]}
    latents = batch_latents(model, frozen, batch, jax.random.PRNGKey(0))
    images = batch["image"] if "image" in batch else model.decode(variables, latents)
    steps = jnp.full((images.shape[0],), t, jnp.int32)
    x_t = noised(
        model, latents, steps, jax.random.normal(jax.random.PRNGKey(1), latents.shape, jnp.float32)
    )
    x0 = predicted_x0(model, x_t, steps, _unet(model, state.ema_params, x_t, steps))
    return dict(
        image=images, noisy=model.decode(variables, x_t), denoised=model.decode(variables, x0)
    )

  return preview


def image_grid(preview: Mapping[str, np.ndarray], n: int = 4) -> np.ndarray:
  """Rows = samples; columns = image | noised | one-step denoised, in [0, 1], shape (1, H n, 3 W,
  3)."""
  n = min(n, len(preview["image"]))
  to01 = lambda x: np.clip((np.asarray(x[:n]) + 1) / 2, 0, 1)
  columns = [to01(preview["image"]), to01(preview["noisy"]), to01(preview["denoised"])]
  return images_lib.tile_columns(columns)[None]


def exported_variables(state: LDMState, first_stage: Any, ema_decay_value: float) -> dict[str, Any]:
  """What ``interop.torch_export.ldm_state_dict`` writes: the raw U-Net, its EMA shadow and LitEma's
  counters."""
  host = jax.device_get(state)
  return dict(
      unet={"params": host.params},
      unet_ema={"params": host.ema_params},
      first_stage=first_stage,
      ema_counters=dict(
          decay=np.asarray(ema_decay_value, np.float32),
          num_updates=np.asarray(int(host.step), np.int32),
      ),
  )
