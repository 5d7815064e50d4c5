"""The MIDMs forward pass: encode, match, interleave DDIM steps with re-warping, decode.

``MIDMs`` composes the three Flax models (first stage, U-Net, correspondence networks) with the
diffusion schedules. Its methods are pure functions of ``variables``
(``{'unet', 'first_stage', 'correspondence'}``, as ``interop.torch_import`` returns them), the
inputs and explicit randomness, so they jit and differentiate as they are.

The interleaved loop (``MIDMs.interleaved_loop``) is one ``jax.lax.scan`` over the loop steps of the
DDIM sub-schedule, each step ``rewarp_and_mix`` (at the re-warp steps) then ``denoise_step``. Its
carry (``LoopCarry``) holds each path's ``Chain``: the x0 prediction and the official ``ddim_param``
pair ``(sqrt(a_prev), dir_xt)``; the first step's ``q_sample`` noising has the same ``a * x0 + d``
form, so every step re-noises its x0 with ``a * x0 + d`` (quirk 1 of the reference: the first step
is noised one DDIM level higher than the U-Net is told). Re-warping happens under ``lax.cond`` at
the configured loop indices (official: 1 and 2), before that step's U-Net call (with
``midms.unroll_loop`` the steps are traced one by one instead, the re-warps placed statically), and
is confidence-masked on the exemplar (ref) path only. Inference skips the src (pseudo-GT) path and
the original-loss sample, which the official code computes and discards, then runs the eta=1
refinement as a second scan. The per-step records (``StepRecord``) hold every intermediate the
parity tests compare with the official code; what no caller reads is dead code under ``jit``.

Every soft warp, cycle warp and flow goes through ``MIDMs._warp``: through the correlation volume
(``midms.warp_chunk = 0``), or blockwise from the matching features (``matching.warp_by_features``,
memory linear in latent pixels) without ever building it; maps warped through one correspondence
share one pass.

Layout NHWC. Images in [-1, 1]; condition maps at image resolution, down-sampled to the latent
grid with PyTorch's nearest rule.
"""

import dataclasses
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from midms_jax.midms import matching
from midms_jax.diffusion.ddim import ddim_update, q_sample
from midms_jax.diffusion.schedule import DDIMSchedule, DiffusionSchedule
from midms_jax.models import build
from midms_jax.models.autoencoder import DiagonalGaussian
from midms_jax.models.correspondence import CorrespondenceNetworks
from midms_jax.models.layers import join_batches, split_batches, torch_nearest_resize

Variables = Mapping[str, Any]
# config.remat: what the backward pass recomputes instead of storing. "unet_blocks": every U-Net
# block; "full": also each interleaved loop step as a whole (from its carry) and the first-stage
# decoder's blocks.
REMAT_POLICIES = ("none", "unet_blocks", "full")


@dataclasses.dataclass(frozen=True)
class MatchingSettings:
  """The ``config.midms`` fields the matching and the loop read (defaults = official)."""

  temperature: float = 0.005
  fb_threshold: float = 0.5
  fbcheck_true_backward: bool = False
  confidence_masking: bool = True
  mask_block: int = 2
  rewarp_steps: tuple[int, ...] = (1, 2)
  apply_scale_factor: bool = False
  kl_latent: str = "sample"
  warp_chunk: int = 0  # query pixels per block of the soft warps; 0: through the dense volume
  rewarp_support: str = (
      "encoder"  # re-warp against real_enc's raw features ("encoder", official) or the
  )
  # phi-head features of the initial matching ("matching")
  loop_start_noise: bool = (
      True  # the loop's first step draws Gaussian noise (False: first_step_noise "none")
  )
  unroll_loop: bool = (
      False  # one traced copy per loop step, re-warps placed statically (no lax.cond)
  )


class Noise(NamedTuple):
  """Every Gaussian draw that reaches a result, in latent shape ``(B, h, w, c)``.

  ``loop_ref`` / ``loop_src``: ``q_sample`` noise of each path's first loop step; ``original``: the
  original-loss sample; ``refine_start`` / ``refine_steps`` ``(n, B, h, w, c)``: the refinement's
  ``q_sample`` and per-step noise. (With the loop's DDIM only x0 and ``dir_xt`` are carried on, so
  the loop draws no per-step noise.)
  """

  loop_ref: jax.Array
  loop_src: jax.Array
  original: jax.Array
  refine_start: jax.Array
  refine_steps: jax.Array


class Match(NamedTuple):
  """A soft correspondence of a query grid to a support grid (``MIDMs._match``).

  ``query`` / ``support``: the normalised matching features ``(B, H, W, C)``. ``corr``: their
  correlation volume ``(B, Hq, Wq, Hs, Ws)`` with ``midms.warp_chunk = 0``; None otherwise, when
  every warp is computed blockwise from the features and no volume exists.
  """

  query: jax.Array
  support: jax.Array
  corr: jax.Array | None


class StepCoefficients(NamedTuple):
  """Per-step scan inputs: U-Net timestep, DDIM coefficients and the first-step noising level."""

  t: jax.Array
  a_t: jax.Array
  a_prev: jax.Array
  sigma: jax.Array
  sqrt_one_minus_a_t: jax.Array
  # sqrt(ā) at time_range[k-1] (q_sample level if this step starts a chain)
  noise_sqrt_ac: jax.Array
  noise_sqrt_1m_ac: jax.Array
  rewarp: jax.Array  # bool: re-warp before this step's U-Net call


class Chain(NamedTuple):
  """One path's DDIM chain: its x0 prediction and the pair that re-noises it, ``x = a * x0 + d``
  (first step: ``q_sample``'s sqrt(ā) and noise part; then the previous step's ``sqrt(a_prev)`` and
  ``dir_xt``, the official ``ddim_param``)."""

  x0: jax.Array
  a: jax.Array
  d: jax.Array


class LoopCarry(NamedTuple):
  """What the interleaved loop carries from step to step."""

  ref: Chain  # the exemplar path: the translation
  src: Chain | None  # the ground-truth path (training only)
  seg: jax.Array  # the exemplar's condition map warped by the newest re-warp
  loss_fb: jax.Array  # the re-warps' cycle losses, summed
  spectral: Any  # spectral-norm state of the correspondence networks


class Rewarp(NamedTuple):
  """One re-warp (``MIDMs.rewarp_and_mix``; zeros at loop steps that do not re-warp). Names: the
  official ones. The volumes ``corr_inter`` / ``src_corr_inter`` exist only in dense mode
  (``midms.warp_chunk = 0``), the ``src`` fields only in training."""

  pred_ref_x0_new: jax.Array  # the exemplar latent warped by the re-matching
  # the re-warp where the cycle is consistent, the chain's x0 elsewhere
  pred_ref_x0_mixed: jax.Array
  fb_mask: jax.Array  # confidence mask (B, h, w, 1)
  fb_mask_raw: jax.Array
  fb_ts: jax.Array  # forward-backward distances
  iter_enc_ref: jax.Array  # the re-matching query (iter_enc of the x0 and condition features)
  iter_warped_ref_seg: jax.Array  # the exemplar's condition warped by the re-matching
  corr_inter: jax.Array | None
  iter_enc_src: jax.Array | None
  src_pred_ref_x0_new: jax.Array | None
  src_corr_inter: jax.Array | None


class DenoiseStep(NamedTuple):
  """One path's DDIM step in the loop (the official ``one_step_sample``)."""

  x0_in: jax.Array  # the x0 the step re-noises (after a re-warp's mix)
  x_noisy: jax.Array  # a * x0_in + d
  eps: jax.Array
  pred_x0: jax.Array
  dir_xt: jax.Array
  sqrt_a_prev: jax.Array
  x_prev: jax.Array


class StepRecord(NamedTuple):
  """Per loop step (stacked over the steps by the loop): the re-warp and each path's denoising
  step."""

  rewarp: Rewarp
  ref: DenoiseStep
  src: DenoiseStep | None


FIRST_STEP_NOISE = ("official", "matched", "none")
REWARP_SUPPORTS = ("encoder", "matching")


def _coefficients(
    schedule: DiffusionSchedule,
    ddim: DDIMSchedule,
    ks,
    rewarp_flags,
    first_step_noise: str = "official",
) -> StepCoefficients:
  """``first_step_noise``: "official" noises a chain's clean start to ``time_range[k-1]`` (one DDIM
  level above the U-Net's timestep, the official off-by-one); "matched" and "none" to the U-Net's
  own timestep ("none" then leaves out the loop's Gaussian draw: ``MIDMs.interleaved_loop``)."""
  steps = [ddim.hijack_step(int(k)) for k in ks]
  if first_step_noise != "official":
    steps = [s._replace(noise_t=s.t) for s in steps]
  f32 = lambda values: jnp.asarray(np.asarray(values, np.float32))
  return StepCoefficients(
      t=jnp.asarray([s.t for s in steps], jnp.int32),
      a_t=f32([s.a_t for s in steps]),
      a_prev=f32([s.a_prev for s in steps]),
      sigma=f32([s.sigma for s in steps]),
      sqrt_one_minus_a_t=f32([s.sqrt_one_minus_a_t for s in steps]),
      noise_sqrt_ac=f32([schedule.sqrt_alphas_cumprod[s.noise_t] for s in steps]),
      noise_sqrt_1m_ac=f32([schedule.sqrt_one_minus_alphas_cumprod[s.noise_t] for s in steps]),
      rewarp=jnp.asarray(rewarp_flags, bool),
  )


def _at(coefficients: StepCoefficients, i) -> StepCoefficients:
  return jax.tree_util.tree_map(lambda a: a[i], coefficients)


def _mse(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.mean(jnp.square(a - b))


def _l1(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.mean(jnp.abs(a - b))


@dataclasses.dataclass(frozen=True, eq=False)
class MIDMs:
  """The MIDMs model built from a config (``MIDMs.from_config(config)``)."""

  unet: Any
  first_stage: Any
  correspondence: CorrespondenceNetworks
  settings: MatchingSettings
  scale_factor: float
  schedule: DiffusionSchedule
  loop: StepCoefficients
  refine: StepCoefficients
  remat_loop_steps: bool = (
      False  # recompute each interleaved step from its carry in the backward pass
  )

  @classmethod
  def from_config(cls, config, inference: bool = False) -> "MIDMs":
    """From a full config (``model``, ``diffusion``, ``midms`` sections); validates the loop
    schedule.

    The interleaved loop runs the training schedule (``config.midms``'s ``ddim_steps``,
    ``interleave_steps``, ``loop_start_step``, ``rewarp_steps``), or with ``inference`` the one
    translations use (``config.midms.inference``: the official 16 / 4 steps whatever training used).
    """
    m, d = config.midms, config.diffusion
    loop_cfg, where = (m.inference, "midms.inference") if inference else (m, "midms")
    schedule = DiffusionSchedule.make(d.beta_schedule, d.timesteps, d.linear_start, d.linear_end)
    loop_ddim = DDIMSchedule.make(schedule, loop_cfg.ddim_steps, m.loop_eta)
    start, length = loop_cfg.loop_start_step, loop_cfg.interleave_steps
    if start < 1 or start + length - 1 > loop_ddim.total_steps - 1:
      raise ValueError(
          f"{where}.loop_start_step={start} with interleave_steps={length} needs hijack steps "
          f"1..{loop_ddim.total_steps - 1} of the {loop_cfg.ddim_steps}-step DDIM schedule"
      )
    rewarp_steps = tuple(loop_cfg.rewarp_steps)
    bad = [i for i in rewarp_steps if not 0 <= i < length]
    if bad:
      raise ValueError(f"{where}.rewarp_steps {bad} outside the {length} loop steps")
    if m.kl_latent not in ("sample", "mode"):
      raise ValueError(f"midms.kl_latent must be 'sample' or 'mode', got {m.kl_latent!r}")
    if m.first_step_noise not in FIRST_STEP_NOISE:
      raise ValueError(
          f"midms.first_step_noise must be one of {FIRST_STEP_NOISE}, got {m.first_step_noise!r}"
      )
    if m.rewarp_support not in REWARP_SUPPORTS:
      raise ValueError(
          f"midms.rewarp_support must be one of {REWARP_SUPPORTS}, got {m.rewarp_support!r}"
      )
    if m.warp_chunk < 0:
      raise ValueError(
          f"midms.warp_chunk must be >= 0 (0: dense correlation volume), got {m.warp_chunk}"
      )
    loop = _coefficients(
        schedule,
        loop_ddim,
        np.arange(start, start + length),
        [i in rewarp_steps for i in range(length)],
        m.first_step_noise,
    )
    refine_ddim = DDIMSchedule.make(schedule, m.refine_steps, m.refine_eta)
    refine_ks = np.arange(m.refine_hijack_step, refine_ddim.total_steps)
    refine = _coefficients(
        schedule, refine_ddim, refine_ks, [False] * len(refine_ks), m.first_step_noise
    )
    settings = MatchingSettings(
        temperature=m.temperature,
        fb_threshold=m.fb_threshold,
        fbcheck_true_backward=m.fbcheck_true_backward,
        confidence_masking=m.confidence_masking,
        mask_block=m.mask_block,
        rewarp_steps=rewarp_steps,
        apply_scale_factor=m.apply_scale_factor,
        kl_latent=m.kl_latent,
        warp_chunk=m.warp_chunk,
        rewarp_support=m.rewarp_support,
        loop_start_noise=m.first_step_noise != "none",
        unroll_loop=m.unroll_loop,
    )
    if config.remat not in REMAT_POLICIES:
      raise ValueError(f"config.remat must be one of {REMAT_POLICIES}, got {config.remat!r}")
    if config.attention_chunk < 0:
      raise ValueError(
          "config.attention_chunk must be >= 0 (0: all queries at once), got "
          f"{config.attention_chunk}"
      )
    dtype = build.compute_dtype(config.dtype)
    return cls(
        unet=build.build_unet(
            config.model.unet,
            dtype,
            remat_blocks=config.remat != "none",
            attention_chunk=config.attention_chunk,
        ),
        first_stage=build.build_first_stage(
            config.model.first_stage, dtype, remat_blocks=config.remat == "full"
        ),
        correspondence=build.build_correspondence(config.model.correspondence, dtype),
        settings=settings,
        remat_loop_steps=config.remat == "full",
        scale_factor=float(config.model.first_stage.scale_factor),
        schedule=schedule,
        loop=loop,
        refine=refine,
    )

  # ----------------------------------------------------------------------------------------------
  # Building blocks
  # ----------------------------------------------------------------------------------------------

  def latent_shape(self, images_shape) -> tuple[int, ...]:
    factor = 2 ** (len(self.first_stage.ch_mult) - 1)
    b, h, w, _ = images_shape
    return (b, h // factor, w // factor, self.first_stage.embed_dim)

  def sample_noise(self, rng: jax.Array, latent_shape) -> Noise:
    """Fresh Gaussian draws for one forward (``jax.random``; the only source of randomness)."""
    keys = jax.random.split(rng, 5)
    draw = lambda key, shape: jax.random.normal(key, shape, jnp.float32)
    n_refine = self.refine.t.shape[0]
    return Noise(
        draw(keys[0], latent_shape),
        draw(keys[1], latent_shape),
        draw(keys[2], latent_shape),
        draw(keys[3], latent_shape),
        draw(keys[4], (n_refine,) + tuple(latent_shape)),
    )

  def encode(
      self, variables: Variables, images: jax.Array, rng: jax.Array | None = None
  ) -> jax.Array:
    """First-stage latent of images (no gradient: the official code detaches it).

    VQ: the pre-quantization latent (``VQModelInterface.encode``). KL: a posterior sample (official;
    needs ``rng``) or its mode (``midms.kl_latent='mode'``).
    """
    return self.encode_batches(variables, [images], [rng])[0]

  def encode_batches(
      self, variables: Variables, batches: Sequence[jax.Array], rngs: Sequence[jax.Array | None]
  ) -> list[jax.Array]:
    """``encode`` of several same-shaped image batches through one encoder call (one batch of all of
    them, joined example by example: half the encoder's compiled code for two); a KL sample of batch
    ``i`` draws its noise from ``rngs[i]``, as a call of its own would."""
    out = self.first_stage.apply(
        variables["first_stage"], join_batches(batches), method=self.first_stage.encode
    )
    # VQ: the latent, in float32 whatever the compute dtype
    if not isinstance(out, DiagonalGaussian):
      latents = [part.astype(jnp.float32) for part in split_batches(out, len(batches))]
    elif self.settings.kl_latent == "mode":
      latents = split_batches(out.mode(), len(batches))
    elif any(rng is None for rng in rngs):
      raise ValueError("encoding with a KL first stage and kl_latent='sample' needs an rng")
    else:
      posteriors = zip(
          split_batches(out.mean, len(batches)), split_batches(out.logvar, len(batches))
      )
      latents = [
          DiagonalGaussian(*posterior).sample(rng) for posterior, rng in zip(posteriors, rngs)
      ]
    if self.settings.apply_scale_factor:
      latents = [latent * self.scale_factor for latent in latents]
    return [jax.lax.stop_gradient(latent) for latent in latents]

  def decode(self, variables: Variables, latents: jax.Array) -> jax.Array:
    """Images from latents (VQ: straight-through quantization first). Unclamped, as the official
    code."""
    if self.settings.apply_scale_factor:
      latents = latents / self.scale_factor
    images = self.first_stage.apply(
        variables["first_stage"], latents, method=self.first_stage.decode
    )
    return images.astype(jnp.float32)

  def _corr_apply(self, variables: Variables, spectral, method, *args, update_stats: bool):
    """Runs a correspondence method with the current spectral-norm state; returns (out, new
    state)."""
    corr_vars = {**variables["correspondence"], "spectral": spectral}
    if not update_stats:
      return (
          self.correspondence.apply(corr_vars, *args, method=method, update_stats=False),
          spectral,
      )
    out, updated = self.correspondence.apply(
        corr_vars, *args, method=method, update_stats=True, mutable=["spectral"]
    )
    return out, updated["spectral"]

  def _unet(self, variables: Variables, x: jax.Array, t: jax.Array) -> jax.Array:
    return self.unet.apply(variables["unet"], x, jnp.full((x.shape[0],), t, jnp.int32)).astype(
        jnp.float32
    )

  def _match(self, query: jax.Array, support: jax.Array) -> Match:
    """The correspondence of normalised features; the volume only in dense mode
    (``warp_chunk = 0``)."""
    corr = matching.correlation(query, support) if self.settings.warp_chunk == 0 else None
    return Match(query, support, corr)

  def _warp(
      self, match: Match, values: Sequence[jax.Array], *, back: bool = False
  ) -> list[jax.Array]:
    """Soft-warps each of ``values`` through ``match``, all in one pass over the correlation:
    support grid -> query grid, or with ``back`` query grid -> support grid (the transposed
    volume)."""
    s = self.settings
    stacked = jnp.concatenate([v.astype(jnp.float32) for v in values], axis=-1)
    if match.corr is not None:
      corr = matching.transpose_correlation(match.corr) if back else match.corr
      warped = matching.soft_warp(stacked, corr, s.temperature)
    else:
      query, support = (match.support, match.query) if back else (match.query, match.support)
      warped = matching.warp_by_features(query, support, stacked, s.temperature, s.warp_chunk)
    pieces = jnp.split(warped, np.cumsum([v.shape[-1] for v in values])[:-1], axis=-1)
    return [piece.astype(v.dtype) for piece, v in zip(pieces, values)]

  def _cycle_loss(self, match: Match, warped: jax.Array, original: jax.Array) -> jax.Array:
    """L1 between ``original`` and ``warped`` warped back through the transposed correlation."""
    return _l1(self._warp(match, [warped], back=True)[0], original)

  def _mask(self, map_trg: jax.Array, map_src: jax.Array) -> dict[str, jax.Array]:
    """fb distances and confidence masks from a correspondence's soft-argmax maps
    (``get_flow``'s)."""
    s = self.settings
    flows = matching.flow_from_maps(map_trg, map_src)
    fb_ts, _ = matching.fbcheck(*flows, true_backward=s.fbcheck_true_backward)
    mask = matching.confidence_mask(fb_ts, s.fb_threshold, s.mask_block)
    return dict(
        fb_ts=fb_ts,
        fb_mask_raw=matching.raw_confidence(fb_ts, s.fb_threshold),
        fb_mask=jax.lax.stop_gradient(mask),
    )

  # ----------------------------------------------------------------------------------------------
  # Initial matching
  # ----------------------------------------------------------------------------------------------

  def initial_matching(
      self,
      variables: Variables,
      spectral,
      condition,
      exemplar_condition,
      exemplar_latent,
      gt_latent=None,
      *,
      update_stats: bool = False,
  ) -> tuple[dict[str, jax.Array], Any]:
    """Matching features and first soft warps (spec 1.3 steps 2-7). ``gt_latent`` None skips the src
    path.

    Condition maps are down-sampled to the latent grid with PyTorch's nearest rule. Call order of
    the correspondence networks is the official one (it matters for train-mode spectral norm). With
    ``gt_latent`` also the first warp's cycle loss ``loss_fb_first_warp`` (train_epoch's
    ``loss_fb``; in warm-up the forward's own cycle term is the same). The volumes ``corr_ref`` /
    ``corr_src`` are returned only in dense mode (``midms.warp_chunk = 0``).
    """
    h, w = exemplar_latent.shape[1:3]
    cond = torch_nearest_resize(condition, h, w)
    ex_cond = torch_nearest_resize(exemplar_condition, h, w)
    nets = CorrespondenceNetworks
    out = dict(condition=cond, exemplar_condition=ex_cond)
    out["trg_matching_feats"], spectral = self._corr_apply(
        variables, spectral, nets.encode_condition, cond, update_stats=update_stats
    )
    if gt_latent is not None:
      out["src_matching_feats"], spectral = self._corr_apply(
          variables, spectral, nets.encode_latent, gt_latent, update_stats=update_stats
      )
    out["ref_matching_feats"], spectral = self._corr_apply(
        variables, spectral, nets.encode_latent, exemplar_latent, update_stats=update_stats
    )
    match = lambda feats, sem, head: matching.normalize_features(
        self.correspondence.apply(
            variables["correspondence"], feats, sem, head, method=nets.match_features
        )
    )
    trg = match(out["trg_matching_feats"], cond, "theta")
    ref = self._match(trg, match(out["ref_matching_feats"], ex_cond, "phi"))
    out["warped_ref_feat"], out["warped_ref_seg"] = self._warp(ref, [exemplar_latent, ex_cond])
    matches = dict(corr_ref=ref)
    out["ref_support_feats"] = ref.support
    if gt_latent is not None:
      src = self._match(trg, match(out["src_matching_feats"], cond, "phi"))
      out["src_support_feats"] = src.support
      (out["warped_src_feat"],) = self._warp(src, [gt_latent])
      out["loss_fb_first_warp"] = self._cycle_loss(ref, out["warped_ref_feat"], exemplar_latent)
      matches["corr_src"] = src
    out.update({name: m.corr for name, m in matches.items() if m.corr is not None})
    return out, spectral

  # ----------------------------------------------------------------------------------------------
  # The interleaved loop
  # ----------------------------------------------------------------------------------------------

  def _rewarp_path(
      self,
      variables,
      spectral,
      x0,
      condition_features,
      support_features,
      latent,
      support_condition=None,
      *,
      update_stats,
  ):
    """Re-warp of one path: iter_enc(x0 | condition features) against the support features (spec
    1.5).

    Returns ``iter_enc``, the warped ``latent`` (``new``), its ``cycle`` loss and in dense mode the
    volume (``corr``). With ``support_condition`` (the exemplar path) also that condition warped
    (``seg``) and the confidence ``mask`` (``_mask``): the coordinate grids ride along in the same
    two passes (forward warp, warp back) to give the soft-argmax maps.
    """
    query, spectral = self._corr_apply(
        variables,
        spectral,
        CorrespondenceNetworks.encode_iterate,
        x0,
        condition_features,
        update_stats=update_stats,
    )
    match = self._match(
        matching.normalize_features(query), matching.normalize_features(support_features)
    )
    out = dict(iter_enc=query, corr=match.corr)
    if support_condition is None:
      (new,) = self._warp(match, [latent])
      (cycled,) = self._warp(match, [new], back=True)
    else:
      grid_s, grid_q = (
          matching.batched_grid(*features.shape[:3]) for features in (support_features, query)
      )
      new, out["seg"], map_trg = self._warp(match, [latent, support_condition, grid_s])
      cycled, map_src = self._warp(match, [new, grid_q], back=True)
      out["mask"] = self._mask(map_trg, map_src)
    out.update(new=new, cycle=_l1(cycled, latent))
    return out, spectral

  def rewarp_and_mix(
      self,
      variables: Variables,
      carry: LoopCarry,
      matched: Mapping[str, jax.Array],
      exemplar_latent,
      gt_latent=None,
      *,
      update_stats: bool,
  ) -> tuple[LoopCarry, Rewarp]:
    """Matching in the photo domain (spec 1.5): each path's x0 is re-matched against its support and
    the support latent warped again; the exemplar path keeps the re-warp where the cycle is
    consistent (the confidence mask) and its own x0 elsewhere. The cycle losses add to
    ``loss_fb``."""
    s = self.settings
    support = "support_feats" if s.rewarp_support == "matching" else "matching_feats"
    condition_features = matched["trg_matching_feats"]
    ref, spectral = self._rewarp_path(
        variables,
        carry.spectral,
        carry.ref.x0,
        condition_features,
        matched[f"ref_{support}"],
        exemplar_latent,
        matched["exemplar_condition"],
        update_stats=update_stats,
    )
    mask = ref["mask"]["fb_mask"] if s.confidence_masking else jnp.ones_like(ref["mask"]["fb_mask"])
    mixed = ref["new"] * mask + carry.ref.x0 * (1 - mask)
    loss_fb, src = ref["cycle"], dict(iter_enc=None, new=None, corr=None)
    if carry.src is not None:
      src, spectral = self._rewarp_path(
          variables,
          spectral,
          carry.src.x0,
          condition_features,
          matched[f"src_{support}"],
          gt_latent,
          update_stats=update_stats,
      )
      loss_fb = loss_fb + src["cycle"]
    record = Rewarp(
        pred_ref_x0_new=ref["new"],
        pred_ref_x0_mixed=mixed,
        **ref["mask"],
        iter_enc_ref=ref["iter_enc"],
        iter_warped_ref_seg=ref["seg"],
        corr_inter=ref["corr"],
        iter_enc_src=src["iter_enc"],
        src_pred_ref_x0_new=src["new"],
        src_corr_inter=src["corr"],
    )
    carry = carry._replace(
        ref=carry.ref._replace(x0=mixed),
        seg=ref["seg"],
        loss_fb=carry.loss_fb + loss_fb,
        spectral=spectral,
    )
    return carry, record

  def denoise_step(
      self, variables: Variables, carry: LoopCarry, coef: StepCoefficients
  ) -> tuple[LoopCarry, tuple[DenoiseStep, DenoiseStep | None]]:
    """Each path's x0 re-noised (``a * x0 + d``), one U-Net call for both paths, one DDIM step (eta
    of the loop; only x0 and the re-noising pair go on, official ``one_step_sample``)."""
    chains = [carry.ref] if carry.src is None else [carry.ref, carry.src]
    x = join_batches([chain.a * chain.x0 + chain.d for chain in chains])
    eps = self._unet(variables, x, coef.t)
    update = ddim_update(x, eps, coef.a_t, coef.a_prev, coef.sigma, coef.sqrt_one_minus_a_t)
    per_path = zip(
        *(
            split_batches(v, len(chains))
            for v in (x, eps, update.pred_x0, update.dir_xt, update.sqrt_a_prev, update.x_prev)
        )
    )
    steps = [DenoiseStep(chain.x0, *values) for chain, values in zip(chains, per_path)]
    ref, src = [Chain(step.pred_x0, step.sqrt_a_prev, step.dir_xt) for step in steps] + [None] * (
        2 - len(steps)
    )
    return carry._replace(ref=ref, src=src), (steps[0], steps[1] if len(steps) == 2 else None)

  def _loop_start(
      self, matched: Mapping[str, jax.Array], noise: Noise, spectral, with_src: bool
  ) -> LoopCarry:
    """Each chain starts at its first warp, noised as ``q_sample`` to the first step's level (or,
    with ``first_step_noise`` "none", scaled to it without a draw)."""
    first = _at(self.loop, 0)
    start = lambda x0, draw: Chain(
        x0,
        jnp.broadcast_to(first.noise_sqrt_ac, x0.shape[:1] + (1, 1, 1)),
        first.noise_sqrt_1m_ac * draw if self.settings.loop_start_noise else jnp.zeros_like(draw),
    )
    return LoopCarry(
        ref=start(matched["warped_ref_feat"], noise.loop_ref),
        src=start(matched["warped_src_feat"], noise.loop_src) if with_src else None,
        seg=matched["warped_ref_seg"],
        loss_fb=jnp.zeros((), jnp.float32),
        spectral=spectral,
    )

  def interleaved_loop(
      self,
      variables: Variables,
      spectral,
      matched: Mapping[str, jax.Array],
      exemplar_latent,
      noise: Noise,
      gt_latent=None,
      *,
      update_stats: bool = False,
  ) -> tuple[LoopCarry, StepRecord]:
    """The method's loop over the DDIM sub-schedule (``self.loop``): at each step re-warp and mix
    (at the re-warp steps), then denoise. ``gt_latent`` None runs only the exemplar path
    (inference).

    Returns the final carry and the per-step records stacked over the steps. One ``lax.scan``
    (re-warps under ``lax.cond``), or with ``midms.unroll_loop`` one traced copy per step with the
    re-warps placed statically; with ``config.remat`` "full" each step is recomputed from its carry
    in the backward pass. Records nobody reads cost nothing under ``jit`` (dead code).
    """
    rewarp = lambda carry: self.rewarp_and_mix(
        variables, carry, matched, exemplar_latent, gt_latent, update_stats=update_stats
    )
    init = self._loop_start(matched, noise, spectral, with_src=gt_latent is not None)
    no_rewarp_record = jax.tree_util.tree_map(
        lambda r: jnp.zeros(r.shape, r.dtype), jax.eval_shape(rewarp, init)[1]
    )

    def step(carry: LoopCarry, coef: StepCoefficients, rewarp_here: bool | None = None):
      """``rewarp_here`` None: decided at run time by ``coef.rewarp`` (``lax.cond``); a bool:
      statically."""
      skip = lambda carry: (carry, no_rewarp_record)
      if rewarp_here is None:
        carry, rewarped = jax.lax.cond(coef.rewarp, rewarp, skip, carry)
      else:
        carry, rewarped = rewarp(carry) if rewarp_here else skip(carry)
      carry, (ref, src) = self.denoise_step(variables, carry, coef)
      return carry, StepRecord(rewarped, ref, src)

    if self.remat_loop_steps:
      step = jax.checkpoint(step, static_argnums=(2,))
    if not self.settings.unroll_loop:
      return jax.lax.scan(lambda carry, coef: step(carry, coef, None), init, self.loop)
    carry, records = init, []
    # no while loop: no stacked residuals, no cond keeping both branches'
    for i in range(self.loop.t.shape[0]):
      carry, record = step(carry, _at(self.loop, i), i in self.settings.rewarp_steps)
      records.append(record)
    return carry, jax.tree_util.tree_map(lambda *r: jnp.stack(r), *records)

  def original_loss_sample(
      self, variables: Variables, gt_latent: jax.Array, noise: jax.Array, index: jax.Array
  ):
    """The extra one-step denoise of the clean GT latent at loop step ``index`` (a traced int)."""
    coef = _at(self.loop, index)
    x = q_sample(gt_latent, coef.noise_sqrt_ac, coef.noise_sqrt_1m_ac, noise)
    eps = self._unet(variables, x, coef.t)
    update = ddim_update(x, eps, coef.a_t, coef.a_prev, coef.sigma, coef.sqrt_one_minus_a_t)
    return _mse(update.pred_x0, gt_latent), dict(x_noisy=x, eps=eps, pred_x0=update.pred_x0)

  def refine_latent(self, variables: Variables, x0: jax.Array, noise: Noise):
    """Inference refinement (official ``sample(200, eta=1, hijack_step=180)``): noise x0 one DDIM
    level above the first step, run the stochastic DDIM steps. Returns the last x0 prediction and
    the per-step ``x``, ``eps``, ``pred_x0``, ``x_prev``."""
    first = _at(self.refine, 0)
    x = q_sample(x0, first.noise_sqrt_ac, first.noise_sqrt_1m_ac, noise.refine_start)

    def step(x, inputs):
      coef, step_noise = inputs
      eps = self._unet(variables, x, coef.t)
      update = ddim_update(
          x, eps, coef.a_t, coef.a_prev, coef.sigma, coef.sqrt_one_minus_a_t, step_noise
      )
      return update.x_prev, dict(x=x, eps=eps, pred_x0=update.pred_x0, x_prev=update.x_prev)

    _, records = jax.lax.scan(step, x, (self.refine, noise.refine_steps))
    return records["pred_x0"][-1], records

  # ----------------------------------------------------------------------------------------------
  # Entry points
  # ----------------------------------------------------------------------------------------------

  def translate(
      self,
      variables: Variables,
      condition: jax.Array,
      exemplar: jax.Array,
      exemplar_condition: jax.Array,
      rng: jax.Array,
      *,
      refine: bool = True,
      noise: Noise | None = None,
  ) -> dict[str, Any]:
    """Inference: the image with ``condition``'s structure and ``exemplar``'s appearance.

    ``condition`` / ``exemplar_condition`` ``(B, H, W, label_channels)``, ``exemplar``
    ``(B, H, W, 3)`` in [-1, 1]. Returns ``image`` (unclamped, [-1, 1] nominal), ``latent``,
    ``fb_mask`` (mask of the last re-warp), ``initial_warp``, ``loop_latent`` (before the
    refinement), ``steps`` (the loop's ``StepRecord``), ``matched`` (``initial_matching``) and
    ``refine`` (the refinement's steps; empty without it). ``noise`` overrides the draws from
    ``rng``.
    """
    encode_key, noise_key = jax.random.split(rng)
    exemplar_latent = self.encode(variables, exemplar, encode_key)
    if noise is None:
      noise = self.sample_noise(noise_key, exemplar_latent.shape)
    spectral = variables["correspondence"]["spectral"]
    matched, _ = self.initial_matching(
        variables, spectral, condition, exemplar_condition, exemplar_latent
    )
    end, steps = self.interleaved_loop(variables, spectral, matched, exemplar_latent, noise)
    latent, refine_records = end.ref.x0, {}
    if refine:
      latent, refine_records = self.refine_latent(variables, latent, noise)
    last_rewarp = max(self.settings.rewarp_steps) if self.settings.rewarp_steps else None
    fb_mask = steps.rewarp.fb_mask[last_rewarp] if last_rewarp is not None else None
    return dict(
        image=self.decode(variables, latent),
        latent=latent,
        fb_mask=fb_mask,
        steps=steps,
        initial_warp=matched["warped_ref_feat"],
        loop_latent=end.ref.x0,
        matched=matched,
        refine=refine_records,
    )

  def train_forward(
      self,
      variables: Variables,
      batch: Mapping[str, jax.Array],
      rng: jax.Array,
      *,
      warmup: bool,
      update_stats: bool = True,
      noise: Noise | None = None,
      original_index: jax.Array | None = None,
      decode_rewarps: bool = False,
  ):
    """Training forward (official ``mode="default"``): everything the losses need.

    ``batch``: ``image`` (GT photo of the condition), ``ref`` (exemplar), ``label`` (condition),
    ``label_ref`` (exemplar's condition), NHWC. ``warmup`` (static) skips the diffusion loop as the
    official code does before ``warmup_iter``. ``update_stats`` runs the spectral-norm power
    iteration on every call (PyTorch train mode). Returns ``(outputs, new spectral state)``; the
    outputs hold the correlation volumes ``corr_ref`` / ``corr_src`` only in dense mode
    (``midms.warp_chunk = 0``), and after warm-up ``rewarped_ref_x0`` (R, B, h, w, c): each re-warp
    of the exemplar path before masking, and with ``decode_rewarps`` (static; for ``loss.rewarp``)
    their images ``rewarped_ref`` (R, B, H, W, 3), decoded in the same decoder call as both paths'
    outputs. Also ``matched`` (``initial_matching``), and after warm-up ``steps`` (the loop's
    ``StepRecord``) and ``original_sample`` (the original-loss step's values).
    """
    encode_key, noise_key, index_key = jax.random.split(rng, 3)
    gt_key, ex_key = jax.random.split(encode_key)
    gt_latent, exemplar_latent = self.encode_batches(
        variables, [batch["image"], batch["ref"]], [gt_key, ex_key]
    )
    spectral = variables["correspondence"]["spectral"]
    matched, spectral = self.initial_matching(
        variables,
        spectral,
        batch["label"],
        batch["label_ref"],
        exemplar_latent,
        gt_latent,
        update_stats=update_stats,
    )
    kept = (
        "trg_matching_feats",
        "src_matching_feats",
        "ref_matching_feats",
        "warped_ref_feat",
        "loss_fb_first_warp",
    )
    out = dict(
        src_feats=gt_latent,
        ref_feats=exemplar_latent,
        **{k: matched[k] for k in kept},
        **{k: matched[k] for k in ("corr_src", "corr_ref") if k in matched},
    )
    if warmup:
      pred_ref, pred_src = matched["warped_ref_feat"], matched["warped_src_feat"]
      out["original_loss"] = _mse(matched["warped_src_feat"], gt_latent)
      out["loss_fb"] = out["loss_fb_first_warp"]
      out["iter_warped_ref_seg"] = matched["warped_ref_seg"]
    else:
      if noise is None:
        noise = self.sample_noise(noise_key, gt_latent.shape)
      if original_index is None:
        original_index = jax.random.randint(index_key, (), 0, self.loop.t.shape[0])
      end, out["steps"] = self.interleaved_loop(
          variables, spectral, matched, exemplar_latent, noise, gt_latent, update_stats=update_stats
      )
      pred_ref, pred_src, spectral = end.ref.x0, end.src.x0, end.spectral
      out["original_loss"], out["original_sample"] = self.original_loss_sample(
          variables, gt_latent, noise.original, original_index
      )
      out["loss_fb"], out["iter_warped_ref_seg"] = end.loss_fb, end.seg
      if self.settings.rewarp_steps:
        news = out["steps"].rewarp.pred_ref_x0_new
        out["rewarped_ref_x0"] = jnp.stack([news[i] for i in self.settings.rewarp_steps])
    # One decoder call for both paths (and the re-warps): the decoder's compiled code once (forward
    # and backward).
    rewarps = list(out["rewarped_ref_x0"]) if decode_rewarps and "rewarped_ref_x0" in out else []
    decoded = split_batches(
        self.decode(variables, join_batches([pred_ref, pred_src, *rewarps])), 2 + len(rewarps)
    )
    out["warped_ref"], out["warped_src"] = decoded[:2]
    if rewarps:
      out["rewarped_ref"] = jnp.stack(decoded[2:])
    out["pred_ref_x0"], out["pred_src_x0"], out["matched"] = pred_ref, pred_src, matched
    return out, spectral
