"""Where a training step's time goes: each part of the interleaved (main-phase) step timed on its own.

    python benchmarks/components.py --config=configs/celebahq.py --per_device_batch=4 --config.dtype=bfloat16
    python benchmarks/components.py --config=configs/celebahq.py:cpu_small --per_device_batch=2

Each part is jitted alone, at the shapes it has inside the step, on one device; forward and backward
(with respect to the same arguments as in the step) where the step differentiates it:

- ``encode``: the first stage's encoder over ground truths and exemplars (forward only: detached);
- ``initial_matching``: correspondence encoders, the first soft warps and their cycle loss;
- ``unet``: one U-Net call over both paths (the loop makes ``interleave_steps`` of them, plus one
  for the original loss);
- ``interleaved_loop``: the whole loop (U-Net calls, re-warps, masking), so loop minus
  ``interleave_steps`` x ``unet`` is the re-warps' and the loop's own cost;
- ``decode``: the first stage's decoder over both paths' outputs;
- ``losses``: the VGG19 features and every loss term (``midms_losses``).

Prints a JSON line per part (median time, FLOPs as ``benchmarks/train_step.py`` counts them, TFLOP/s, MFU
on accelerators, compile time) and a table. A part far below the others' FLOP rate is where to look
when the whole step is slow on a new platform; the sum, weighted by how often the step runs each part,
comes close to ``benchmarks/train_step.py``'s step time and is printed as a last JSON line (``step_estimate``:
ms, images/s, MFU) when every part ran. ``--parts`` picks parts and their order. Random weights from ``random_inputs`` (no
Flax init compile), and random inputs of the right shapes where one part feeds another, so each part
compiles only itself; progress on stderr says which part is counting, compiling or timing.
"""

import json
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

import random_inputs  # benchmarks/random_inputs.py: the script's own directory is on sys.path
from progress import progress  # benchmarks/progress.py
from midms_jax import flops, platform_tuning
from midms_jax.losses import vgg as vgg_lib
from midms_jax.losses.midms_losses import midms_losses
from midms_jax.models import build
from midms_jax.models.layers import join_batches
from midms_jax.midms.model import MIDMs

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/celebahq.py", "model and training config"
)
_PER_DEVICE = flags.DEFINE_integer("per_device_batch", 1, "examples per step on the device")
_ITERS = flags.DEFINE_integer("iters", 5, "timed calls after the first one")
_PARTS = flags.DEFINE_list("parts", "", "only these parts, in this order (default: all)")
_PRECISION = flags.DEFINE_enum(
    "matmul_precision", "default", ["default", "high", "highest"], "jax_default_matmul_precision"
)


def _sum_of_squares(tree) -> jax.Array:
  """A scalar that depends on every floating leaf: the loss that a part's backward pass starts
  from."""
  leaves = [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
  return sum(jnp.mean(jnp.square(x.astype(jnp.float32))) for x in leaves)


def _differentiated(fn: Callable, argnums) -> Callable:
  """The gradient of ``fn``'s outputs' sum of squares with respect to ``argnums``: ``fn``'s forward
  and backward."""
  return jax.grad(lambda *args: _sum_of_squares(fn(*args)), argnums=argnums)


def _random_stand_in(fn: Callable, *args, seed: int) -> object:
  """Random arrays with the shapes and dtypes of ``fn(*args)``, on the device, without compiling
  ``fn``: a part's inputs that another part produces (latents, the first warps, the step's outputs)
  need only their shapes for timing, and compiling the producers would spend minutes of a device
  session before the first figure.
  """
  return jax.tree_util.tree_map(
      jnp.asarray, random_inputs.random_like(jax.eval_shape(fn, *args), seed)
  )


def make_parts(
    model: MIDMs, config, variables, vgg_variables, batch
) -> dict[str, tuple[Callable, tuple]]:
  """{part: (function, arguments)} at the shapes of one main-phase step on ``batch``; nothing is
  compiled here."""
  rng = jax.random.PRNGKey(0)
  photos = [batch["image"], batch["ref"]]
  encode = lambda v, x: model.encode_batches(v, x, [rng, rng])
  gt_latent, exemplar_latent = _random_stand_in(encode, variables, photos, seed=1)
  spectral = variables["correspondence"]["spectral"]
  noise = model.sample_noise(rng, gt_latent.shape)
  params = {k: variables[k]["params"] for k in ("unet", "correspondence")}
  with_params = lambda p: dict(
      variables,
      unet={"params": p["unet"]},
      correspondence={"params": p["correspondence"], "spectral": spectral},
  )

  def matching(p, cond, ex_cond, ex_latent, gt):
    out, _ = model.initial_matching(
        with_params(p), spectral, cond, ex_cond, ex_latent, gt, update_stats=True
    )
    return out

  matched = _random_stand_in(
      matching, params, batch["label"], batch["label_ref"], exemplar_latent, gt_latent, seed=2
  )

  def loop(p, matched_, ex_latent, gt):
    end, _ = model.interleaved_loop(
        with_params(p), spectral, matched_, ex_latent, noise, gt, update_stats=True
    )
    return dict(pred_ref_x0=end.ref.x0, pred_src_x0=end.src.x0, loss_fb=end.loss_fb, seg=end.seg)

  first_t = int(jax.device_get(model.loop.t)[0])

  def unet(unet_params, x):
    return model.unet.apply({"params": unet_params}, x, jnp.full((x.shape[0],), first_t, jnp.int32))

  vgg = vgg_lib.loss_network(config.loss, build.compute_dtype(config.dtype))
  features = None if vgg is None else (lambda images: vgg.apply(vgg_variables, images))
  outputs = _random_stand_in(
      lambda v, b: model.train_forward(v, b, rng, warmup=False)[0], variables, batch, seed=3
  )
  differentiable = {k: v for k, v in outputs.items() if jnp.issubdtype(v.dtype, jnp.floating)}

  def losses(outs):
    return midms_losses(outs, batch, features, config.loss, warmup=False, with_context=True)[0]

  return dict(
      encode=(jax.jit(encode), (variables, photos)),
      initial_matching=(
          jax.jit(_differentiated(matching, (0,))),
          (params, batch["label"], batch["label_ref"], exemplar_latent, gt_latent),
      ),
      unet=(
          jax.jit(_differentiated(unet, (0, 1))),
          (params["unet"], join_batches([gt_latent, exemplar_latent])),
      ),
      interleaved_loop=(
          jax.jit(_differentiated(loop, (0,))),
          (params, matched, exemplar_latent, gt_latent),
      ),
      decode=(
          jax.jit(_differentiated(model.decode, (1,))),
          (variables, join_batches([gt_latent, exemplar_latent])),
      ),
      losses=(jax.jit(jax.grad(losses)), (differentiable,)),
  )


# How often a main-phase step runs each part: the loop holds its U-Net calls; the original loss adds
# one U-Net call on the ground-truth path alone, half the ``unet`` part (both paths).
STEP_WEIGHTS = dict(encode=1, initial_matching=1, unet=0.5, interleaved_loop=1, decode=1, losses=1)


def step_estimate(rows: list[dict], batch: int, peak: float | None) -> dict | None:
  """The whole step as the weighted sum of its parts (None unless every part ran): on a device where
  the whole step does not compile in the time at hand, its images/s and MFU from parts that compile
  alone.
  """
  by_part = {row["part"]: row for row in rows}
  if set(by_part) != set(STEP_WEIGHTS):
    return None
  ms = sum(w * by_part[p]["ms"] for p, w in STEP_WEIGHTS.items())
  gflops = sum(w * by_part[p]["gflops"] for p, w in STEP_WEIGHTS.items())
  tflops_per_s = gflops / ms
  return dict(
      part="step_estimate",
      ms=round(ms, 3),
      gflops=round(gflops, 2),
      tflops_per_s=round(tflops_per_s, 3),
      mfu=round(tflops_per_s * 1e12 / peak, 4) if peak else None,
      images_per_s=round(1e3 * batch / ms, 3),
  )


def time_part(name: str, fn: Callable, args: tuple, iters: int) -> dict[str, float]:
  start = time.perf_counter()
  compiled = fn.lower(*args).compile()
  compile_s = time.perf_counter() - start
  progress(f"{name}: compiled in {compile_s:.1f} s; timing")
  times = []
  for _ in range(iters + 1):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return dict(
      compile_s=round(compile_s, 2), ms=round(1e3 * statistics.median(times[1:] or times), 3)
  )


def main(argv):
  del argv
  unknown = sorted(set(_PARTS.value) - set(STEP_WEIGHTS))
  if unknown:
    raise app.UsageError(f"--parts: unknown parts {unknown}; known: {list(STEP_WEIGHTS)}")
  jax.config.update("jax_default_matmul_precision", _PRECISION.value)
  config = _CONFIG.value
  model = MIDMs.from_config(config)
  variables, vgg_variables = jax.device_put(random_inputs.random_variables(config))
  batch = {
      k: jnp.asarray(v) for k, v in random_inputs.random_batch(config, _PER_DEVICE.value).items()
  }
  parts = make_parts(model, config, variables, vgg_variables, batch)
  progress(f"parts traced for shapes on {jax.devices()[0]}")
  device = jax.devices()[0].device_kind
  peak = flops.peak_flops(device, config.dtype)
  rewarp_fraction = len(config.midms.rewarp_steps) / config.midms.interleave_steps
  rows = []
  for name in _PARTS.value or list(parts):
    fn, args = parts[name]
    progress(f"{name}: counting FLOPs")
    part_flops = flops.count_flops(fn, *args, cond_fraction=rewarp_fraction)
    progress(f"{name}: {part_flops / 1e9:.1f} GFLOP; compiling")
    result = time_part(name, fn, args, _ITERS.value)
    tflops_per_s = part_flops / result["ms"] * 1e-9
    row = dict(
        part=name,
        config=config.data.name,
        dtype=config.dtype,
        device=device,
        batch=_PER_DEVICE.value,
        gflops=round(part_flops / 1e9, 2),
        tflops_per_s=round(tflops_per_s, 3),
        mfu=round(tflops_per_s * 1e12 / peak, 4) if peak else None,
        **result,
    )
    print(json.dumps(row), flush=True)
    rows.append(row)
  print(f"\n{'part':<18}{'ms':>10}{'GFLOP':>10}{'TFLOP/s':>10}{'compile s':>11}")
  for row in rows:
    print(
        f"{row['part']:<18}{row['ms']:>10.1f}{row['gflops']:>10.1f}{row['tflops_per_s']:>10.2f}"
        f"{row['compile_s']:>11.1f}"
    )
  estimate = step_estimate(rows, _PER_DEVICE.value, peak)
  if estimate:
    print(json.dumps(estimate), flush=True)
    print(
        f"step as the sum of its parts: {estimate['ms']:.1f} ms, {estimate['images_per_s']:.2f} "
        "images/s"
    )
  unet = next((r for r in rows if r["part"] == "unet"), None)
  loop = next((r for r in rows if r["part"] == "interleaved_loop"), None)
  if unet and loop:
    rest = loop["ms"] - config.midms.interleave_steps * unet["ms"]
    print(
        f"loop minus {config.midms.interleave_steps} U-Net calls (re-warps, masking, loop): "
        f"{rest:.1f} ms"
    )


if __name__ == "__main__":
  platform_tuning.set_xla_flags()
  app.run(main)
