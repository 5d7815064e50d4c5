"""LSUN church segmentation-to-photo (label_nc 150 -> 151 one-hot channels) with LDM's KL-f8
churches model.

Latents are 32x32x4, so the correspondence encoders take 4 input channels. Model and noise schedule
(linear_end 0.0155) are LDM's ``models/ldm/lsun_churches256/config.yaml``; ``config.ldm``
(pre-training) is the CelebA-HQ recipe, not the churches one (l1 loss, base lr 5e-5, batch 96,
linear warm-up). Variants: ``''`` (official sizes), ``paper`` (the paper's learning rates, 3e-6 /
1.5e-7), ``tiny`` (small KL model, 32x32 images -> 4x4x4 latents; for tests).
"""

from configs import base


def get_config(variant: str = ""):
  label_nc = 150
  channels = label_nc + 1  # the official code adds a "don't care" class when label_nc == 150
  if variant in ("", "paper"):
    unet, first_stage = base.ldm_kl_f8_churches_unet(), base.kl_f8()
    corr = base.correspondence(channels, latent_channels=4)
    # label_nc: one-hot channels
    data = base.data("lsun_church", channels, load_size=286, eval_load_size=256)
  elif variant == "tiny":
    unet = base.ldm_kl_f8_churches_unet()
    unet.update(
        dict(
            image_size=4,
            model_channels=32,
            attention_resolutions=(2,),
            channel_mult=(1, 2),
            num_res_blocks=1,
            num_heads=2,
        )
    )
    first_stage = base.kl_f8()
    first_stage.update(dict(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, resolution=32))
    corr = base.correspondence(channels, latent_channels=4)
    corr.update(dict(width=32, base_width=8, spade_hidden=16))
    data = base.data("lsun_church", channels, load_size=36, crop_size=32, eval_load_size=32)
  else:
    raise ValueError(
        f"configs/lsun_church.py: unknown variant {variant!r} (known: '', 'paper', 'tiny')"
    )
  config = base.assemble(data_cfg=data, unet=unet, first_stage=first_stage, corr=corr)
  config.diffusion = base.diffusion(linear_end=0.0155)  # the churches LDM's (CelebA-HQ's: 0.0195)
  # In place: config.evaluate refers to config.loss's vgg_checkpoint / vgg_widths.
  config.loss.update(dict(perc_layer="r52", perc=0.05, segmentation=100.0))
  if variant == "paper":
    config.train.update(base.PAPER_LEARNING_RATES)
  if variant == "tiny":
    config.loss.vgg_widths = base.tiny_vgg_widths()
  return config
