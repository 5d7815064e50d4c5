"""The official optimiser: AdamW with separate learning rates for the correspondence networks and
the U-Net, multi-step decay, and the U-Net frozen during warm-up.

Trainable parameters are ``{'correspondence': ..., 'unet': ...}`` (the first stage and the VGG loss
network are never trained and are not in this tree). Official (``train.py``): AdamW(betas 0.9/0.999,
eps 1e-8, weight decay 0.05), both groups 3e-6, ``MultiStepLR(milestones=[10, 12, 14, 24] epochs,
gamma=0.3)`` stepped at the start of each epoch, no clipping. In warm-up the U-Net has
``requires_grad=False``: PyTorch's AdamW then skips it entirely (no update, no decay, no moment
change), which ``frozen`` reproduces with the same state structure, so the warm-up and the main
step share one optimiser state.
"""

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

GROUPS = ("correspondence", "unet")


def lr_schedule(
    base_lr: float, milestones_epochs, gamma: float, steps_per_epoch: int
) -> optax.Schedule:
  """Multi-step decay: ``base_lr * gamma^k`` after the k-th milestone (epochs converted to
  steps)."""
  boundaries = {int(m) * steps_per_epoch: gamma for m in milestones_epochs}
  return optax.piecewise_constant_schedule(base_lr, boundaries)


def cosine_epoch_schedule(
    base_lr: float, epochs: int, min_lr: float, steps_per_epoch: int
) -> optax.Schedule:
  """PyTorch ``CosineAnnealingLR(T_max=epochs, eta_min)`` stepped once per epoch (official
  ``--scheduler cosine``)."""

  def schedule(step):
    epoch = jnp.asarray(step) // steps_per_epoch
    return min_lr + (base_lr - min_lr) * (1 + jnp.cos(jnp.pi * epoch / epochs)) / 2

  return schedule


def lr_schedules(train_cfg, steps_per_epoch: int) -> dict[str, optax.Schedule]:
  """Per-group schedules of the global step (official: both 3e-6, decayed x0.3 at epochs 10, 12, 14,
  24)."""
  base = dict(correspondence=train_cfg.lr, unet=train_cfg.lr_diff_backbone)
  if train_cfg.lr_schedule == "cosine":
    return {
        group: cosine_epoch_schedule(
            base[group], train_cfg.epochs, train_cfg.lr_min, steps_per_epoch
        )
        for group in GROUPS
    }
  if train_cfg.lr_schedule != "step":
    raise ValueError(
        f"config.train.lr_schedule must be 'step' or 'cosine', got {train_cfg.lr_schedule!r}"
    )
  return {
      group: lr_schedule(base[group], train_cfg.lr_milestones, train_cfg.lr_gamma, steps_per_epoch)
      for group in GROUPS
  }


def frozen(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """``inner``'s state structure, but zero updates and an unchanged state (PyTorch
  requires_grad=False)."""

  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map(jnp.zeros_like, updates), state

  return optax.GradientTransformation(inner.init, update)


def _adamw(train_cfg, base_lr: float) -> optax.GradientTransformation:
  """AdamW whose learning rate lives in the state (``with_learning_rates`` sets it per step)."""
  # A strongly typed float32 learning rate: the value with_learning_rates writes has the same type,
  # so the state's type does not change after the first step (no recompilation).
  return optax.inject_hyperparams(optax.adamw)(
      learning_rate=jnp.asarray(base_lr, jnp.float32),
      b1=train_cfg.adam_b1,
      b2=train_cfg.adam_b2,
      eps=train_cfg.adam_eps,
      weight_decay=train_cfg.weight_decay,
  )


def _labels(params: Mapping[str, Any]) -> dict[str, Any]:
  return {group: jax.tree_util.tree_map(lambda _, g=group: g, params[group]) for group in params}


def make_optimizer(train_cfg, *, freeze_unet: bool) -> optax.GradientTransformation:
  """The optimiser over ``{'correspondence', 'unet'}``; ``freeze_unet`` for the warm-up phase.

  Both settings have the same state pytree, so the state carries over when the phase switches.
  Adam's step count (bias correction) of a frozen group does not advance, as in PyTorch, so the
  learning rates are not schedules of that count: ``with_learning_rates`` sets them from the global
  step before each update.
  """
  unet = _adamw(train_cfg, train_cfg.lr_diff_backbone)
  return optax.multi_transform(
      dict(
          correspondence=_adamw(train_cfg, train_cfg.lr), unet=frozen(unet) if freeze_unet else unet
      ),
      param_labels=_labels,
  )


def _in_group(group: str):
  """``optax.tree_utils`` filter: the values inside parameter group ``group`` of the state."""
  return lambda path, _: any(getattr(key, "key", None) == group for key in path)


def with_learning_rates(
    opt_state: Any, step: jax.Array, schedules: Mapping[str, optax.Schedule]
) -> Any:
  """``opt_state`` with each group's learning rate set to its schedule at the global ``step``."""
  for group, schedule in schedules.items():
    current = optax.tree_utils.tree_get(opt_state, "learning_rate", filtering=_in_group(group))
    lr = jnp.asarray(schedule(step), current.dtype)
    opt_state = optax.tree_utils.tree_set(opt_state, _in_group(group), learning_rate=lr)
  return opt_state


def learning_rates(opt_state: Any) -> dict[str, jax.Array]:
  """Current learning rate of each group (for logging)."""
  return {
      group: optax.tree_utils.tree_get(opt_state, "learning_rate", filtering=_in_group(group))
      for group in GROUPS
  }


def trainable(variables: Mapping[str, Any]) -> dict[str, Any]:
  """The trainable ``params`` collections out of ``{'unet', 'first_stage', 'correspondence'}``
  variables."""
  return {group: variables[group]["params"] for group in GROUPS}
