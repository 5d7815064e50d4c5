"""The benchmark configs equal, field by field, the official files they stand for.

The official values are written out below (not read from the network), each table citing its
source: ``L:`` CompVis/latent-diffusion @ a506df5, ``M:`` cvlab-kaist/MIDMs @ 625d88a. Values an
official yaml leaves out are the defaults of the class it instantiates (cited too). A drift in any
config fails here with the list of differing fields.
"""

import pytest

from configs import celebahq, deepfashion, lsun_church
from midms_jax.models import build

# L:ldm/models/diffusion/ddpm.py DDPM.__init__ defaults: beta_schedule "linear",
# parameterization "eps". L:configs/latent-diffusion/celebahq-ldm-vq-4.yaml and
# L:models/ldm/celeba256/config.yaml (model.params).
DIFFUSION_CELEBAHQ = dict(
    timesteps=1000,
    beta_schedule="linear",
    linear_start=0.0015,
    linear_end=0.0195,
    parameterization="eps",
)
# L:models/ldm/lsun_churches256/config.yaml (model.params).
DIFFUSION_CHURCHES = dict(DIFFUSION_CELEBAHQ, linear_end=0.0155)

# L:configs/latent-diffusion/celebahq-ldm-vq-4.yaml unet_config.params (the same in
# L:models/ldm/celeba256/config.yaml); the rest: UNetModel.__init__ defaults
# (L:ldm/modules/diffusionmodules/openaimodel.py).
UNET_VQ_F4 = dict(
    image_size=64,
    in_channels=3,
    out_channels=3,
    model_channels=224,
    num_res_blocks=2,
    attention_resolutions=(8, 4, 2),
    channel_mult=(1, 2, 3, 4),
    num_head_channels=32,
    num_heads=-1,
    dropout=0.0,
    conv_resample=True,
    use_scale_shift_norm=False,
    resblock_updown=False,
    use_new_attention_order=False,
)
# L:models/ldm/lsun_churches256/config.yaml unet_config.params; defaults as above.
UNET_CHURCHES = dict(
    image_size=32,
    in_channels=4,
    out_channels=4,
    model_channels=192,
    num_res_blocks=2,
    attention_resolutions=(1, 2, 4, 8),
    channel_mult=(1, 2, 2, 4, 4),
    num_heads=8,
    num_head_channels=-1,
    dropout=0.0,
    conv_resample=True,
    use_scale_shift_norm=True,
    resblock_updown=True,
    use_new_attention_order=False,
)
# Unset in every one of those yamls: UNetModel defaults our U-Net does not implement (a config
# must not claim another value).
UNET_UNSUPPORTED_DEFAULTS = dict(
    use_spatial_transformer=False, num_classes=None, legacy=True, dims=2
)

# L:models/first_stage_models/vq-f4/config.yaml, and first_stage_config.params of
# L:configs/latent-diffusion/celebahq-ldm-vq-4.yaml (identical ddconfig). attn_type: default of
# Encoder/Decoder (L:ldm/modules/diffusionmodules/model.py); scale_factor: LatentDiffusion's
# default 1.0 (the CelebA-HQ LDM is not scale_by_std).
VQ_F4 = dict(
    type="vq",
    embed_dim=3,
    n_embed=8192,
    double_z=False,
    z_channels=3,
    resolution=256,
    in_channels=3,
    out_ch=3,
    ch=128,
    ch_mult=(1, 2, 4),
    num_res_blocks=2,
    attn_resolutions=(),
    dropout=0.0,
    attn_type="vanilla",
    scale_factor=1.0,
)
# L:models/first_stage_models/kl-f8/config.yaml (= first_stage_config.params of
# L:models/ldm/lsun_churches256/config.yaml). n_embed 0: no codebook. scale_factor: the yaml sets
# scale_by_std (the value lives in the LDM checkpoint); the official MIDMs code never applies it.
KL_F8 = dict(
    type="kl",
    embed_dim=4,
    n_embed=0,
    double_z=True,
    z_channels=4,
    resolution=256,
    in_channels=3,
    out_ch=3,
    ch=128,
    ch_mult=(1, 2, 4, 4),
    num_res_blocks=2,
    attn_resolutions=(),
    dropout=0.0,
    attn_type="vanilla",
    scale_factor=1.0,
)

# LDM model.params image_size / channels (latent grid) of the yamls above.
LATENT_VQ_F4 = (64, 3)
LATENT_CHURCHES = (32, 4)


def _correspondence(label_channels: int, latent_channels: int) -> dict:
  # M:models/midms.py MIDMs.__init__ (N_CH 256, 4 ResidualBlocks in `layer`, inch/ic 4 for
  # AutoencoderKL), M:models/generator.py ShallowAdaptiveFeatureGenerator* (ndf /
  # encoder_hidden_dim 64), M:models/normalization.py SPADE (nhidden 128).
  return dict(
      width=256,
      base_width=64,
      spade_hidden=128,
      trunk_blocks=4,
      label_channels=label_channels,
      latent_channels=latent_channels,
  )


def _data(label_nc: int, load_size: int, eval_load_size: int) -> dict:
  # M:data/<benchmark>_dataset.py modify_commandline_options (load_size train / test, crop_size,
  # label_nc; LSUN church: label_nc 150 + the don't-care class MIDMs one-hot encodes,
  # M:models/midms.py).
  return dict(label_nc=label_nc, load_size=load_size, eval_load_size=eval_load_size, crop_size=256)


# M:models/midms.py MIDMs.forward, M:models/diffusion/ddim.py, M:inference.py and M:train.py
# defaults (diffusion_iteratiom_num 4 -> 16 DDIM steps, loop from hijack step 3 * 16 // 4, re-warps
# at loop indices 1 and 2, soft-warp temperature 0.005, fb threshold 0.5, refinement
# sample(200, eta=1, hijack_step=180)).
MIDMS_SAMPLING = dict(
    ddim_steps=16,
    interleave_steps=4,
    loop_start_step=12,
    first_step_noise="official",
    loop_eta=0.0,
    rewarp_steps=(1, 2),
    temperature=0.005,
    fb_threshold=0.5,
    fbcheck_true_backward=False,
    confidence_masking=True,
    mask_block=2,
    refine_steps=200,
    refine_eta=1.0,
    refine_hijack_step=180,
    apply_scale_factor=False,
    kl_latent="sample",
    rewarp_support="encoder",
)
# M:models/midms.py MIDMs.forward with mode="inference": 16 DDIM steps and t_list 12..15 whatever
# diffusion_iteratiom_num training used; re-warps at loop indices 1 and 2.
MIDMS_INFERENCE = dict(ddim_steps=16, interleave_steps=4, loop_start_step=12, rewarp_steps=(1, 2))

OFFICIAL = {
    "celebahq": dict(
        diffusion=DIFFUSION_CELEBAHQ,
        unet=UNET_VQ_F4,
        first_stage=VQ_F4,
        latent=LATENT_VQ_F4,
        correspondence=_correspondence(15, 3),
        data=_data(15, 286, 256),
    ),
    # M: ships no DeepFashion LDM config or weights; like configs/deepfashion.py, the table takes
    # the CelebA-HQ VQ-f4 LDM architecture (latent 64x64x3, M:'s VQ branch).
    "deepfashion": dict(
        diffusion=DIFFUSION_CELEBAHQ,
        unet=UNET_VQ_F4,
        first_stage=VQ_F4,
        latent=LATENT_VQ_F4,
        correspondence=_correspondence(20, 3),
        data=_data(20, 256, 256),
    ),
    "lsun_church": dict(
        diffusion=DIFFUSION_CHURCHES,
        unet=UNET_CHURCHES,
        first_stage=KL_F8,
        latent=LATENT_CHURCHES,
        correspondence=_correspondence(151, 4),
        data=_data(151, 286, 256),
    ),
}
MODULES = {"celebahq": celebahq, "deepfashion": deepfashion, "lsun_church": lsun_church}
# Variants with the official model sizes (``paper`` differs in learning rates only).
OFFICIAL_VARIANTS = [(name, variant) for name in OFFICIAL for variant in ("", "paper")]
# Every variant, for what belongs to the data set rather than to the widths (the noise schedule).
ALL_VARIANTS = OFFICIAL_VARIANTS + [
    ("celebahq", "tiny"),
    ("celebahq", "cpu_small"),
    ("deepfashion", "tiny"),
    ("lsun_church", "tiny"),
]


def _differences(section, table: dict, where: str, exact_keys: bool = True) -> list[str]:
  got = section.to_dict()
  problems = [
      f"{where}.{key}: config {got.get(key, '<missing>')!r}, official {want!r}"
      for key, want in table.items()
      if key not in got or _normal(got[key]) != _normal(want)
  ]
  if exact_keys:
    problems += [
        f"{where}.{key}: not in the official table (value {got[key]!r})"
        for key in sorted(got.keys() - table.keys())
    ]
  return problems


def _normal(value):
  return tuple(value) if isinstance(value, (list, tuple)) else value


def _assert_no_differences(problems: list[str]) -> None:
  assert not problems, f"{len(problems)} field(s) differ from the official files:\n" + "\n".join(
      problems
  )


@pytest.mark.parametrize("name,variant", OFFICIAL_VARIANTS)
def test_official_variants_equal_the_official_files(name, variant):
  config, official = MODULES[name].get_config(variant), OFFICIAL[name]
  problems = _differences(config.diffusion, official["diffusion"], "diffusion")
  problems += _differences(config.model.unet, official["unet"], "model.unet")
  problems += _differences(config.model.first_stage, official["first_stage"], "model.first_stage")
  problems += _differences(
      config.model.correspondence, official["correspondence"], "model.correspondence"
  )
  problems += _differences(config.data, official["data"], "data", exact_keys=False)
  problems += _differences(config.midms, MIDMS_SAMPLING, "midms", exact_keys=False)
  problems += _differences(config.midms.inference, MIDMS_INFERENCE, "midms.inference")
  for key, default in UNET_UNSUPPORTED_DEFAULTS.items():
    if config.model.unet.get(key, default) != default:
      problems.append(f"model.unet.{key}: {config.model.unet[key]!r}, official {default!r}")
  latent = (build.latent_size(config.model.first_stage), config.model.first_stage.embed_dim)
  if latent != official["latent"]:
    problems.append(f"latent (size, channels): config {latent}, official {official['latent']}")
  _assert_no_differences(problems)


@pytest.mark.parametrize("name,variant", ALL_VARIANTS)
def test_every_variant_has_its_data_sets_official_schedule(name, variant):
  config = MODULES[name].get_config(variant)
  _assert_no_differences(_differences(config.diffusion, OFFICIAL[name]["diffusion"], "diffusion"))


def test_a_drift_is_reported_field_by_field():
  config = lsun_church.get_config()
  config.diffusion.linear_end = 0.0195
  config.model.unet.num_heads = 4
  problems = _differences(config.diffusion, DIFFUSION_CHURCHES, "diffusion")
  problems += _differences(config.model.unet, UNET_CHURCHES, "model.unet")
  assert problems == [
      "diffusion.linear_end: config 0.0195, official 0.0155",
      "model.unet.num_heads: config 4, official 8",
  ]
