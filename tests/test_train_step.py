"""The training steps: warm-up freezes the U-Net, the phases share one state, losses go down,
and a step sharded over 8 devices equals the single-device step."""

import json
import pathlib
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from benchmarks import collective_census, random_inputs
from configs import celebahq
from midms_jax import ldm, optim, sharding, train_step
from midms_jax.interop import torch_import
from midms_jax.models import vgg
from midms_jax.midms.model import MIDMs
from tests.conftest import BackgroundJob, FIXTURES

pytest.importorskip("torch")
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _setup(batch_size: int = 2, lr: float = 3e-6):
  config = celebahq.get_config("tiny")
  config.train.lr = config.train.lr_diff_backbone = lr
  config.train.warmup_iter = 2
  model = MIDMs.from_config(config)
  variables = torch_import.load_midms_checkpoint(FIXTURES / "midms_small.pth", config.model)
  frozen = train_step.frozen_variables(
      variables, vgg.load_vgg19(FIXTURES / "vgg19_small.pth", config.loss.vgg_widths)
  )
  rng = np.random.default_rng(0)
  batch = dict(
      image=rng.uniform(-1, 1, (batch_size, 32, 32, 3)).astype(np.float32),
      ref=rng.uniform(-1, 1, (batch_size, 32, 32, 3)).astype(np.float32),
      label=rng.uniform(0, 1, (batch_size, 32, 32, 15)).astype(np.float32),
      label_ref=rng.uniform(0, 1, (batch_size, 32, 32, 15)).astype(np.float32),
  )
  tx = optim.make_optimizer(config.train, freeze_unet=True)
  return config, model, variables, frozen, batch, tx


# Adam moves a coordinate by about +-lr whatever its gradient's size, so a near-zero gradient whose
# sign depends on the summation order differs by up to 2 lr between device counts: keep lr well
# below the 1e-5 tolerance.
DP_BATCH, DP_LR = 8, 1e-6


def _one_main_step(n_devices: int, fsdp: int = 1) -> dict:
  """Loss, grad norm and flattened parameters after one interleaved step from the initial state,
  global batch ``DP_BATCH``, on a (data, fsdp) mesh of the first ``n_devices`` devices;
  ``fsdp_fraction``: the largest parameter's share held by one device; ``activation_moves``: the
  compiled step's collectives that move data between devices along the batch (collective-permute,
  all-to-all), none in a data-parallel step.
  """
  config, model, variables, frozen, batch, tx = _setup(batch_size=DP_BATCH, lr=DP_LR)
  mesh = sharding.data_mesh(jax.devices()[:n_devices], fsdp=fsdp)
  state = train_step.create_train_state(variables, tx)
  shardings = train_step.state_shardings(state, mesh)
  steps = train_step.make_train_steps(
      model, config, steps_per_epoch=100, mesh=mesh, state_sharding=shardings
  )
  args = (
      jax.device_put(state, shardings),
      sharding.replicate(frozen, mesh),
      sharding.global_batch(mesh, batch),
  )
  compiled = steps.main.lower(*args).compile()
  state, metrics = compiled(*args)
  largest = max(jax.tree_util.tree_leaves(state.params), key=lambda x: x.size)
  params = np.concatenate([np.asarray(x).ravel() for x in jax.tree_util.tree_leaves(state.params)])
  return dict(
      loss=float(metrics["loss_total"]),
      grad_norm=float(metrics["grad_norm"]),
      params=params,
      fsdp_fraction=largest.addressable_shards[0].data.size / largest.size,
      activation_moves=_activation_moves(compiled),
  )


def _activation_moves(compiled) -> int:
  return collective_census.activation_moves(
      collective_census.collective_census(compiled.as_text())[0]
  )


def _ldm_step_activation_moves(n_devices: int, fsdp: int) -> int:
  """``_activation_moves`` of the LDM stage's step (global batch ``DP_BATCH``), compiled from
  shapes."""
  config = celebahq.get_config("tiny")
  mesh = sharding.data_mesh(jax.devices()[:n_devices], fsdp=fsdp)
  state, frozen, batch = random_inputs.abstract_ldm_step_inputs(config, DP_BATCH)
  step = ldm.make_step(
      MIDMs.from_config(config), config, mesh, state_sharding=ldm.state_shardings(state, mesh)
  )
  return _activation_moves(step.lower(state, frozen, batch).compile())


def test_warmup_freezes_unet_then_main_step_trains_it():
  # DP test's programs
  config, model, variables, frozen, batch, tx = _setup(batch_size=DP_BATCH, lr=DP_LR)
  mesh = sharding.data_mesh()
  steps = train_step.make_train_steps(model, config, steps_per_epoch=100, mesh=mesh)
  state = sharding.replicate(train_step.create_train_state(variables, tx), mesh)
  frozen, batch = sharding.replicate(frozen, mesh), sharding.global_batch(mesh, batch)
  unet_before = jax.tree_util.tree_map(np.asarray, state.params["unet"])
  corr_before = jax.tree_util.tree_map(np.asarray, state.params["correspondence"])
  spectral_before = jax.tree_util.tree_map(np.asarray, state.spectral)
  state, metrics = steps.warmup(state, frozen, batch)
  state, metrics = steps.warmup(state, frozen, batch)
  jax.tree_util.tree_map(np.testing.assert_array_equal, state.params["unet"], unet_before)
  assert any(
      not np.array_equal(a, b)
      for a, b in zip(
          jax.tree_util.tree_leaves(state.params["correspondence"]),
          jax.tree_util.tree_leaves(corr_before),
      )
  )
  assert any(
      not np.array_equal(a, b)
      for a, b in zip(
          jax.tree_util.tree_leaves(state.spectral), jax.tree_util.tree_leaves(spectral_before)
      )
  )
  assert (
      np.isfinite(metrics["loss_total"])
      and float(metrics["grad_norm"]) > 0
      and bool(metrics["finite"])
  )
  state, metrics = steps.main(state, frozen, batch)
  assert any(
      not np.array_equal(a, b)
      for a, b in zip(
          jax.tree_util.tree_leaves(state.params["unet"]), jax.tree_util.tree_leaves(unet_before)
      )
  )
  state, _ = steps.main(state, frozen, batch)
  assert int(state.step) == 4
  assert steps.warmup._cache_size() == 1 and steps.main._cache_size() == 1  # no recompilation


def test_losses_decrease_on_a_fixed_batch():
  config, model, variables, frozen, batch, tx = _setup(lr=1e-4)
  config.train.warmup_iter = 100
  steps = train_step.make_train_steps(model, config, steps_per_epoch=100)
  state = train_step.create_train_state(variables, tx)
  losses = []
  for _ in range(6):
    state, metrics = steps.warmup(state, frozen, batch)
    losses.append(float(metrics["loss_total"]))
  assert losses[-1] < losses[0], losses


_DP_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    from tests.test_train_step import _ldm_step_activation_moves, _one_main_step
    result = _one_main_step(8, fsdp=4)
    np.save(sys.argv[1], result.pop("params"))
    print(json.dumps(dict(devices=len(jax.devices()), ldm_activation_moves=_ldm_step_activation_moves(8, 4), **result)))
""")


def _eight_device_step(job: BackgroundJob) -> tuple[subprocess.CompletedProcess, pathlib.Path]:
  """``_DP_SCRIPT`` on 8 simulated CPU devices (a background job): the finished process and its
  parameters file."""
  env = dict(job.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  params_path = job.dir / "params_8.npy"
  return (
      job.run([sys.executable, "-c", _DP_SCRIPT, str(params_path)], timeout=900, cwd=ROOT, env=env),
      params_path,
  )


@pytest.mark.background(launcher=_eight_device_step)
def test_eight_devices_match_one_device(background):
  """One interleaved-phase step, global batch 8: 8 simulated CPU devices (a subprocess; 2
  data-parallel groups x 4-way fsdp, so both the batch split and the parameter sharding are
  exercised) vs 1 device, and no activations moved between the devices in that step nor in the LDM
  stage's step."""
  one = _one_main_step(1)  # while the job may still run (when this test runs alone)
  out, params_path = background()
  assert out.returncode == 0, out.stderr[-3000:]
  eight = json.loads(out.stdout.strip().splitlines()[-1])
  assert eight["devices"] == 8 and eight["fsdp_fraction"] == 0.25  # each device holds a quarter
  # examples stay on their device (layers.join_batches, not concatenate)
  assert eight["activation_moves"] == 0
  # nor in the LDM stage (parameters gathered whole: whole_parameters)
  assert eight["ldm_activation_moves"] == 0
  for key in ("loss", "grad_norm"):
    assert abs(one[key] - eight[key]) <= 1e-5 * max(1.0, abs(one[key])), (key, one[key], eight[key])
  assert np.max(np.abs(np.load(params_path) - one["params"])) <= 1e-5


def test_fsdp_spec_splits_the_largest_divisible_dimension():
  split = sharding.FSDP_AXIS
  assert sharding.fsdp_spec((3, 3, 256, 512), 4) == PartitionSpec(None, None, None, split)
  assert sharding.fsdp_spec((1024, 96), 64) == PartitionSpec(split, None)
  # no dimension divisible by 4: replicated
  assert sharding.fsdp_spec((1030, 97), 4) == PartitionSpec()
  assert sharding.fsdp_spec((256,), 4) == PartitionSpec()  # too small to be worth splitting
  assert sharding.fsdp_spec((3, 3, 256, 512), 1) == PartitionSpec()
  with pytest.raises(ValueError, match="fsdp=2 must divide the 1 devices"):
    sharding.data_mesh(jax.devices()[:1], fsdp=2)
