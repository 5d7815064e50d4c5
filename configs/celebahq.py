"""CelebA-HQ edge-to-face (label_nc 15) with LDM's CelebA-HQ VQ-f4 model.

Variants: ``configs/celebahq.py`` (official sizes), ``configs/celebahq.py:paper`` (official sizes
with the paper's learning rates 3e-6 / 1.5e-7 instead of the code's 3e-6 / 3e-6),
``configs/celebahq.py:tiny`` (the reduced widths of the official parity fixtures, 32x32 images; for
tests) and ``configs/celebahq.py:cpu_small`` (the "small config" of the official CPU speed baseline:
64x64 images, official correspondence widths).
"""

from configs import base


def get_config(variant: str = ""):
  label_nc = 15
  if variant in ("", "paper"):
    models = dict(
        unet=base.ldm_vq_f4_unet(), first_stage=base.vq_f4(), corr=base.correspondence(label_nc)
    )
    data = base.data("celebahq", label_nc, load_size=286, eval_load_size=256)
  elif variant == "tiny":
    models = base.tiny_vq_models(label_nc)
    data = base.data("celebahq", label_nc, load_size=36, crop_size=32, eval_load_size=32)
  elif variant == "cpu_small":
    unet = base.ldm_vq_f4_unet()
    unet.update(
        dict(image_size=16, model_channels=64, channel_mult=(1, 2, 2), attention_resolutions=(2, 4))
    )
    first_stage = base.vq_f4()
    first_stage.update(dict(resolution=64, ch=64))
    models = dict(unet=unet, first_stage=first_stage, corr=base.correspondence(label_nc))
    data = base.data("celebahq", label_nc, load_size=64, crop_size=64)
  else:
    raise ValueError(
        f"configs/celebahq.py: unknown variant {variant!r} (known: '', 'paper', 'tiny', "
        "'cpu_small')"
    )
  config = base.assemble(data_cfg=data, **models)
  if variant == "paper":
    config.train.update(base.PAPER_LEARNING_RATES)
  if variant == "tiny":
    config.loss.vgg_widths = base.tiny_vgg_widths()
  return config
