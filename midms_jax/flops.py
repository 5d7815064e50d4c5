"""Matrix-multiply and convolution FLOPs of a JAX function, counted on its jaxpr.

XLA's ``cost_analysis`` counts the body of a ``while`` loop once, so it undercounts everything
inside ``lax.scan`` (the interleaved loop, the refinement): here a scan's body counts ``length``
times. Only ``dot_general`` and ``conv_general_dilated`` are counted (2 FLOPs per multiply-add), the
usual basis of model FLOPs utilisation; element-wise work is left out. A ``cond`` counts as its
cheapest branch plus ``cond_fraction`` times the difference to its most expensive one: MIDMs' only
data-dependent conditional is the re-warp inside the loop, so
``cond_fraction = re-warp steps / loop steps`` makes the count exact. Rematerialised code counts
once more where the backward pass recomputes it (hardware FLOPs).
"""

import math
from typing import Any, Callable

import jax
from jax.extend import core as jex_core


def _dot_general_flops(eqn) -> float:
  (lhs_contract, _), _ = eqn.params["dimension_numbers"]
  lhs = eqn.invars[0].aval
  contracted = math.prod(lhs.shape[d] for d in lhs_contract)
  return 2.0 * math.prod(eqn.outvars[0].aval.shape) * contracted


def _conv_flops(eqn) -> float:
  """2 x output elements x (kernel input features x kernel window): every output is one such dot
  product."""
  rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature, in feature, spatial...)
  rhs = eqn.invars[1].aval
  window = math.prod(rhs.shape[d] for d in rhs_spec[2:])
  return 2.0 * math.prod(eqn.outvars[0].aval.shape) * rhs.shape[rhs_spec[1]] * window


def _sub_jaxprs(value: Any):
  if isinstance(value, jex_core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jex_core.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for item in value:
      yield from _sub_jaxprs(item)


def jaxpr_flops(jaxpr: jex_core.Jaxpr, cond_fraction: float = 1.0) -> float:
  """FLOPs of one execution of ``jaxpr`` (see the module docstring for what counts)."""
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot_general_flops(eqn)
    elif name == "conv_general_dilated":
      total += _conv_flops(eqn)
    elif name == "cond":
      branches = [jaxpr_flops(b.jaxpr, cond_fraction) for b in eqn.params["branches"]]
      total += min(branches) + cond_fraction * (max(branches) - min(branches))
    elif name == "scan":
      total += eqn.params["length"] * jaxpr_flops(eqn.params["jaxpr"].jaxpr, cond_fraction)
    else:  # jit, remat, custom_jvp/vjp, while (counted once: its trip count is not static), ...
      total += sum(
          jaxpr_flops(sub, cond_fraction)
          for value in eqn.params.values()
          for sub in _sub_jaxprs(value)
      )
  return total


def count_flops(fn: Callable, *args, cond_fraction: float = 1.0, **kwargs) -> float:
  """FLOPs of ``fn(*args, **kwargs)``, traced abstractly (args may be ``jax.ShapeDtypeStruct``s)."""
  return jaxpr_flops(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr, cond_fraction)


# Dense peak FLOP/s per chip from the vendors' data sheets: (device_kind substring, bfloat16,
# float32 matmuls at XLA's default precision: TF32 on NVIDIA GPUs, bf16 passes on TPUs). The first
# matching row wins.
_PEAK_FLOPS = (
    ("H100 PCIe", 756e12, 378e12),
    ("H100", 989e12, 494e12),  # SXM
    ("H200", 989e12, 494e12),
    ("A100", 312e12, 156e12),
    ("TPU v6 lite", 918e12, 918e12),
    ("TPU v5 lite", 197e12, 197e12),  # v5e
    ("TPU v5", 459e12, 459e12),  # v5p
    ("TPU v4", 275e12, 275e12),
)


def peak_flops(device_kind: str, dtype: str) -> float | None:
  """Peak FLOP/s of one device for ``dtype`` ('bfloat16' or 'float32'); None where unknown
  (CPUs)."""
  for name, bf16, fp32 in _PEAK_FLOPS:
    if name in device_kind:
      return bf16 if dtype == "bfloat16" else fp32
  return None
