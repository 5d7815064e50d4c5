"""The training state and the two compiled training steps (warm-up and interleaved), data-parallel.

``TrainState`` holds what changes: the step, the trainable parameters (correspondence networks and
U-Net), the spectral-norm vectors, and the optimiser state. What never trains (the first stage, the
VGG19 loss network) is passed separately as ``frozen``. Per-step randomness is
``fold_in(PRNGKey(seed), step)``, so results do not depend on the device count.

Parallelism (``midms_jax.sharding``): data parallel over every device of every host, parameters and
AdamW moments optionally split ``fsdp`` ways (``state_shardings``).
"""

import dataclasses
from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from midms_jax import optim, sharding
from midms_jax.losses.midms_losses import midms_losses
from midms_jax.losses import vgg as vgg_lib
from midms_jax.models import build
from midms_jax.midms.model import MIDMs


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict[str, Any]  # {'correspondence': ..., 'unet': ...}
  spectral: dict[str, Any]  # spectral-norm u, v of the correspondence networks
  opt_state: Any


def create_train_state(
    variables: Mapping[str, Any], tx: optax.GradientTransformation
) -> TrainState:
  params = optim.trainable(variables)
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      spectral=variables["correspondence"]["spectral"],
      opt_state=tx.init(params),
  )


def frozen_variables(
    variables: Mapping[str, Any], vgg_variables: Mapping[str, Any]
) -> dict[str, Any]:
  """What the step reads but never updates: the first stage and the VGG loss network."""
  return dict(first_stage=variables["first_stage"], vgg=vgg_variables)


def model_variables(state: TrainState, frozen: Mapping[str, Any], params=None) -> dict[str, Any]:
  """The ``{'unet', 'first_stage', 'correspondence'}`` variables the forward pass reads."""
  params = state.params if params is None else params
  return dict(
      unet={"params": params["unet"]},
      first_stage=frozen["first_stage"],
      correspondence={"params": params["correspondence"], "spectral": state.spectral},
  )


@dataclasses.dataclass(frozen=True)
class StepFunctions:
  """The warm-up and the interleaved training step, each jitted once."""

  warmup: Callable
  main: Callable


def make_train_steps(
    model: MIDMs, config, steps_per_epoch: int, mesh: Mesh | None = None, state_sharding: Any = None
) -> StepFunctions:
  """Builds both steps: ``step(state, frozen, batch) -> (state, metrics)``; ``state`` is donated.

  With a ``mesh``, the batch is sharded over all its devices, frozen variables are replicated and
  the state is placed as ``state_sharding`` (``state_shardings(state, mesh)``; None: replicated);
  without one, plain ``jax.jit``. Split parameters are gathered whole for the forward and backward
  pass (``whole_parameters``), so every layer runs data parallel.
  """
  vgg = vgg_lib.loss_network(config.loss, build.compute_dtype(config.dtype))
  schedules = optim.lr_schedules(config.train, steps_per_epoch)
  warmup_iter = config.train.warmup_iter
  seed = config.train.seed

  def step(state: TrainState, frozen, batch, *, warmup: bool):
    tx = optim.make_optimizer(config.train, freeze_unet=warmup)
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), state.step)

    def loss_fn(params):
      variables = model_variables(state, frozen, sharding.whole_parameters(params, mesh))
      outputs, spectral = model.train_forward(
          variables,
          batch,
          rng,
          warmup=warmup,
          update_stats=True,
          decode_rewarps=bool(config.loss.rewarp),
      )
      features = None if vgg is None else (lambda images: vgg.apply(frozen["vgg"], images))
      total, terms = midms_losses(
          outputs,
          batch,
          features,
          config.loss,
          warmup=warmup,
          with_context=state.step > warmup_iter,
      )
      # Collapse monitor: an output that copies the exemplar is much closer to it than to the ground
      # truth.
      terms["monitor/output_to_exemplar_l1"] = jnp.mean(
          jnp.abs(outputs["warped_ref"] - batch["ref"])
      )
      terms["monitor/output_to_gt_l1"] = jnp.mean(jnp.abs(outputs["warped_ref"] - batch["image"]))
      return total, (terms, spectral)

    (total, (terms, spectral)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    opt_state = optim.with_learning_rates(state.opt_state, state.step, schedules)
    updates, opt_state = tx.update(grads, opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    metrics = dict(
        terms,
        grad_norm=grad_norm,
        finite=all_finite(total, grad_norm, params, spectral),
        **{f"learning_rate/{k}": v for k, v in optim.learning_rates(opt_state).items()},
    )
    return (
        TrainState(step=state.step + 1, params=params, spectral=spectral, opt_state=opt_state),
        metrics,
    )

  compile_step = lambda warmup: sharding.jit_step(
      lambda state, frozen, batch: step(state, frozen, batch, warmup=warmup), mesh, state_sharding
  )
  return StepFunctions(warmup=compile_step(True), main=compile_step(False))


def all_finite(*trees: Any) -> jax.Array:
  """Whether every floating-point value in ``trees`` is finite: the step's report to the training
  loop, which never saves a state after a step that reported False."""
  leaves = [x for x in jax.tree_util.tree_leaves(trees) if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.stack([jnp.isfinite(x).all() for x in leaves]).all() if leaves else jnp.bool_(True)


def state_shardings(state: TrainState, mesh: Mesh) -> TrainState:
  """Per-leaf ``NamedSharding`` of a (possibly abstract) state: parameters and optimiser moments by
  ``sharding.fsdp_spec``, the step and the spectral-norm vectors replicated."""
  replicated = sharding.replicated(mesh)
  return TrainState(
      step=replicated,
      params=sharding.split_shardings(state.params, mesh),
      spectral=jax.tree_util.tree_map(lambda _: replicated, state.spectral),
      opt_state=sharding.split_shardings(state.opt_state, mesh),
  )
