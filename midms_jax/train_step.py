"""The training state and the two compiled training steps (warm-up and interleaved), data-parallel.

``TrainState`` holds what changes: the step, the trainable parameters (correspondence networks and
U-Net), the spectral-norm vectors, and the optimiser state. What never trains (the first stage, the
VGG19 loss network) is passed separately as ``frozen``. Per-step randomness is
``fold_in(PRNGKey(seed), step)``, so results do not depend on the device count.

Parallelism: ``jax.jit`` over a 2-D ``Mesh`` (``data``, ``fsdp``) of every device of every host; the batch
is sharded over both axes (every device takes its rows). With ``fsdp`` = 1 (default) parameters and
optimiser state are replicated and GSPMD inserts the gradient all-reduce: plain data parallelism. With
``fsdp`` = k > 1 (``config.train.fsdp``) each parameter and its AdamW moments are split k ways along their
largest dimension divisible by k (``state_shardings``), so a large U-Net's state takes 1/k of the memory
per device; GSPMD gathers a parameter where it is used and reduce-scatters its gradient (ZeRO-3 style).
"""

import dataclasses
from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from midms_jax import optim
from midms_jax.losses.midms_losses import midms_losses
from midms_jax.losses import vgg as vgg_lib
from midms_jax.models import build
from midms_jax.models.midms import MIDMs

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)  # the batch is split over every device
MIN_FSDP_ELEMENTS = 2**14  # smaller leaves (biases, norms) stay replicated: splitting them saves nothing


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict[str, Any]      # {'correspondence': ..., 'unet': ...}
  spectral: dict[str, Any]    # spectral-norm u, v of the correspondence networks
  opt_state: Any


def create_train_state(variables: Mapping[str, Any], tx: optax.GradientTransformation) -> TrainState:
  params = optim.trainable(variables)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    spectral=variables["correspondence"]["spectral"], opt_state=tx.init(params))


def frozen_variables(variables: Mapping[str, Any], vgg_variables: Mapping[str, Any]) -> dict[str, Any]:
  """What the step reads but never updates: the first stage and the VGG loss network."""
  return dict(first_stage=variables["first_stage"], vgg=vgg_variables)


def model_variables(state: TrainState, frozen: Mapping[str, Any], params=None) -> dict[str, Any]:
  """The ``{'unet', 'first_stage', 'correspondence'}`` variables the forward pass reads."""
  params = state.params if params is None else params
  return dict(unet={"params": params["unet"]}, first_stage=frozen["first_stage"],
              correspondence={"params": params["correspondence"], "spectral": state.spectral})


@dataclasses.dataclass(frozen=True)
class StepFunctions:
  """The warm-up and the interleaved training step, each jitted once."""
  warmup: Callable
  main: Callable


def make_train_steps(model: MIDMs, config, steps_per_epoch: int, mesh: Mesh | None = None,
                     state_sharding: Any = None) -> StepFunctions:
  """Builds both steps: ``step(state, frozen, batch) -> (state, metrics)``; ``state`` is donated.

  With a ``mesh``, the batch is sharded over all its devices, frozen variables are replicated and the
  state is placed as ``state_sharding`` (``state_shardings(state, mesh)``; None: replicated); without
  one, plain ``jax.jit``. Split parameters are gathered whole for the forward and backward pass
  (``whole_parameters``), so every layer runs data parallel.
  """
  vgg = vgg_lib.loss_network(config.loss, build.compute_dtype(config.dtype))
  schedules = optim.lr_schedules(config.train, steps_per_epoch)
  warmup_iter = config.train.warmup_iter
  seed = config.train.seed

  def step(state: TrainState, frozen, batch, *, warmup: bool):
    tx = optim.make_optimizer(config.train, freeze_unet=warmup)
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), state.step)

    def loss_fn(params):
      variables = model_variables(state, frozen, whole_parameters(params, mesh))
      outputs, spectral = model.train_forward(variables, batch, rng, warmup=warmup, update_stats=True,
                                              decode_rewarps=bool(config.loss.rewarp))
      features = None if vgg is None else (lambda images: vgg.apply(frozen["vgg"], images))
      total, terms = midms_losses(outputs, batch, features, config.loss, warmup=warmup,
                                  with_context=state.step > warmup_iter)
      # Collapse monitor: an output that copies the exemplar is much closer to it than to the ground truth.
      terms["monitor/output_to_exemplar_l1"] = jnp.mean(jnp.abs(outputs["warped_ref"] - batch["ref"]))
      terms["monitor/output_to_gt_l1"] = jnp.mean(jnp.abs(outputs["warped_ref"] - batch["image"]))
      return total, (terms, spectral)

    (total, (terms, spectral)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    opt_state = optim.with_learning_rates(state.opt_state, state.step, schedules)
    updates, opt_state = tx.update(grads, opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    metrics = dict(terms, grad_norm=grad_norm, finite=all_finite(total, grad_norm, params, spectral),
                   **{f"learning_rate/{k}": v for k, v in optim.learning_rates(opt_state).items()})
    return TrainState(step=state.step + 1, params=params, spectral=spectral, opt_state=opt_state), metrics

  def compile_step(warmup: bool):
    fn = lambda state, frozen, batch: step(state, frozen, batch, warmup=warmup)
    if mesh is None:
      return jax.jit(fn, donate_argnums=0)
    replicated = NamedSharding(mesh, PartitionSpec())
    state = replicated if state_sharding is None else state_sharding
    return jax.jit(fn, in_shardings=(state, replicated, batch_sharding(mesh)), out_shardings=(state, replicated),
                   donate_argnums=0)

  return StepFunctions(warmup=compile_step(True), main=compile_step(False))


def all_finite(*trees: Any) -> jax.Array:
  """Whether every floating-point value in ``trees`` is finite: the step's report to the training loop, which
  never saves a state after a step that reported False."""
  leaves = [x for x in jax.tree_util.tree_leaves(trees) if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.stack([jnp.isfinite(x).all() for x in leaves]).all() if leaves else jnp.bool_(True)


def whole_parameters(params: Any, mesh: Mesh | None) -> Any:
  """``params`` gathered whole on every device of ``mesh`` (unchanged without one), for a step's forward and
  backward pass: with ``fsdp`` split parameters, XLA would otherwise split layers along the parameters'
  split axis and move activations between devices (all-to-all); the gradients are reduce-scattered back."""
  return params if mesh is None else jax.lax.with_sharding_constraint(params, NamedSharding(mesh, PartitionSpec()))


def data_mesh(devices=None, fsdp: int = 1) -> Mesh:
  """The (``data``, ``fsdp``) mesh over every device of every process (or the given ones): ``fsdp``
  devices share each parameter, ``devices / fsdp`` groups of them run data parallel."""
  devices = np.asarray(jax.devices() if devices is None else devices).reshape(-1)
  if fsdp < 1 or devices.size % fsdp:
    raise ValueError(f"fsdp={fsdp} must divide the {devices.size} devices")
  return Mesh(devices.reshape(devices.size // fsdp, fsdp), BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def fsdp_spec(shape: tuple[int, ...], fsdp: int) -> PartitionSpec:
  """Splits the largest dimension divisible by ``fsdp`` over the ``fsdp`` axis; leaves below
  ``MIN_FSDP_ELEMENTS`` or without such a dimension stay replicated."""
  if fsdp == 1 or int(np.prod(shape)) < MIN_FSDP_ELEMENTS:
    return PartitionSpec()
  divisible = [axis for axis, size in enumerate(shape) if size % fsdp == 0]
  if not divisible:
    return PartitionSpec()
  axis = max(divisible, key=lambda a: shape[a])
  return PartitionSpec(*(FSDP_AXIS if a == axis else None for a in range(len(shape))))


def state_shardings(state: TrainState, mesh: Mesh) -> TrainState:
  """Per-leaf ``NamedSharding`` of a (possibly abstract) state: parameters and optimiser moments by
  ``fsdp_spec``, the step and the spectral-norm vectors replicated."""
  fsdp = mesh.shape[FSDP_AXIS]
  replicated = NamedSharding(mesh, PartitionSpec())
  split = lambda leaf: NamedSharding(mesh, fsdp_spec(np.shape(leaf), fsdp))
  return TrainState(step=replicated, params=jax.tree_util.tree_map(split, state.params),
                    spectral=jax.tree_util.tree_map(lambda _: replicated, state.spectral),
                    opt_state=jax.tree_util.tree_map(split, state.opt_state))


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a pytree on every device of the mesh, as the steps' outputs are: the first call then hits the
  same compiled step as every later one (an unplaced input would compile a second variant)."""
  return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def global_batch(mesh: Mesh, local_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
  """Assembles the global batch from this host's part (``jax.make_array_from_process_local_data``)."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}
