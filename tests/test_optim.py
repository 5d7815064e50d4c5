"""The optimiser: PyTorch AdamW numerics, per-group learning-rate schedules, the warm-up freeze."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import celebahq
from midms_jax import optim

torch = pytest.importorskip("torch")


def _train_cfg(**overrides):
  cfg = celebahq.get_config("tiny").train
  cfg.update(overrides)
  return cfg


def test_matches_torch_adamw_and_multistep_lr():
  """Two groups, 6 steps, milestones at epochs 1 and 2 (2 steps per epoch), as train.py's
  MultiStepLR."""
  cfg = _train_cfg(lr=1e-2, lr_diff_backbone=5e-3, lr_milestones=(1, 2), lr_gamma=0.3)
  rng = np.random.default_rng(0)
  init = {
      "correspondence": {"w": rng.normal(size=(3, 4)).astype(np.float32)},
      "unet": {"k": rng.normal(size=(5,)).astype(np.float32)},
  }
  grads_seq = [
      {
          g: {k: rng.normal(size=v.shape).astype(np.float32) for k, v in p.items()}
          for g, p in init.items()
      }
      for _ in range(6)
  ]
  tw, tk = torch.tensor(init["correspondence"]["w"], requires_grad=True), torch.tensor(
      init["unet"]["k"], requires_grad=True
  )
  opt = torch.optim.AdamW(
      [{"params": [tw], "lr": 1e-2}, {"params": [tk], "lr": 5e-3}], weight_decay=0.05
  )
  sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[1, 2], gamma=0.3)
  tx = optim.make_optimizer(cfg, freeze_unet=False)
  schedules = optim.lr_schedules(cfg, steps_per_epoch=2)
  params = jax.tree_util.tree_map(jnp.asarray, init)
  state = tx.init(params)
  for step, grads in enumerate(grads_seq):
    if step % 2 == 0:
      sched.step(step // 2)  # official: scheduler.step(epoch) at the start of each epoch
    tw.grad, tk.grad = torch.tensor(grads["correspondence"]["w"]), torch.tensor(grads["unet"]["k"])
    opt.step()
    state = optim.with_learning_rates(state, step, schedules)
    updates, state = tx.update(jax.tree_util.tree_map(jnp.asarray, grads), state, params)
    params = jax.tree_util.tree_map(lambda p, u: p + u, params, updates)
  np.testing.assert_allclose(params["correspondence"]["w"], tw.detach().numpy(), atol=1e-6)
  np.testing.assert_allclose(params["unet"]["k"], tk.detach().numpy(), atol=1e-6)
  np.testing.assert_allclose(float(optim.learning_rates(state)["unet"]), 5e-3 * 0.09, rtol=1e-6)


def test_frozen_unet_gets_no_update_no_decay_and_keeps_its_adam_state():
  cfg = _train_cfg()
  params = {"correspondence": {"w": jnp.ones(3)}, "unet": {"k": jnp.ones(2)}}
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  warm, main = optim.make_optimizer(cfg, freeze_unet=True), optim.make_optimizer(
      cfg, freeze_unet=False
  )
  state = warm.init(params)
  updates, new_state = warm.update(grads, state, params)
  np.testing.assert_array_equal(updates["unet"]["k"], 0.0)
  assert np.all(np.asarray(updates["correspondence"]["w"]) < 0)
  jax.tree_util.tree_map(
      np.testing.assert_array_equal, new_state.inner_states["unet"], state.inner_states["unet"]
  )
  assert jax.tree_util.tree_structure(main.init(params)) == jax.tree_util.tree_structure(new_state)


def test_cosine_schedule_per_epoch():
  cfg = _train_cfg(lr_schedule="cosine", epochs=4, lr=3e-6, lr_min=1e-6)
  schedule = optim.lr_schedules(cfg, steps_per_epoch=10)["correspondence"]
  expected = [1e-6 + 2e-6 * (1 + np.cos(np.pi * e / 4)) / 2 for e in range(4)]
  np.testing.assert_allclose([float(schedule(10 * e + 3)) for e in range(4)], expected, rtol=1e-6)
  with pytest.raises(ValueError, match="lr_schedule must be 'step' or 'cosine'"):
    optim.lr_schedules(_train_cfg(lr_schedule="linear"), 10)
