"""Config files: every file/variant loads through the command-line flag, overrides reach the
fields."""

import pathlib

import pytest
from absl import flags
from ml_collections import config_flags

from midms_jax.models import build

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIGS = [
    ("celebahq", ""),
    ("celebahq", "tiny"),
    ("celebahq", "cpu_small"),
    ("deepfashion", ""),
    ("deepfashion", "tiny"),
    ("lsun_church", ""),
    ("lsun_church", "tiny"),
    ("synthetic", ""),
]


def _parse(*argv: str):
  values = flags.FlagValues()
  argv = ["prog", *argv]
  config_flags.DEFINE_config_file("config", None, "config file", flag_values=values, sys_argv=argv)
  values(argv)
  return values.config


@pytest.mark.parametrize("name,variant", CONFIGS)
def test_config_loads_and_models_instantiate(name, variant):
  spec = f"{ROOT}/configs/{name}.py" + (f":{variant}" if variant else "")
  config = _parse(f"--config={spec}")
  abstract = build.abstract_variables(config.model)
  for part in ("unet", "first_stage", "correspondence"):
    parameter_free = part == "first_stage" and config.model.first_stage.type == "pixel_shuffle"
    assert (build.count_params(abstract[part]) == 0) == parameter_free
  # The U-Net works on the first stage's latent grid; correspondence takes the condition's channels.
  assert config.model.unet.image_size == build.latent_size(config.model.first_stage)
  assert config.model.unet.in_channels == config.model.first_stage.embed_dim
  assert config.model.correspondence.latent_channels == config.model.first_stage.embed_dim


def test_command_line_overrides_reach_the_model():
  config = _parse(
      f"--config={ROOT}/configs/celebahq.py:tiny",
      "--config.model.unet.model_channels=64",
      "--config.train.lr=1e-4",
  )
  assert config.model.unet.model_channels == 64 and config.train.lr == 1e-4
  assert build.abstract_unet(config.model.unet)["params"]["time_embed.0"]["kernel"].shape == (
      64,
      256,
  )


def test_unknown_variant_names_the_file():
  with pytest.raises(Exception, match=r"celebahq.py: unknown variant 'huge'"):
    _parse(f"--config={ROOT}/configs/celebahq.py:huge")


def test_official_sizes():
  from configs import celebahq, lsun_church  # pylint: disable=import-outside-toplevel

  model = celebahq.get_config().model
  assert build.count_params(build.abstract_unet(model.unet)) == 274_056_163
  assert build.count_params(build.abstract_first_stage(model.first_stage)) == 55_322_782
  assert build.latent_size(model.first_stage) == 64
  church = lsun_church.get_config().model
  assert build.latent_size(church.first_stage) == 32 and church.correspondence.label_channels == 151


@pytest.mark.parametrize("name", ["celebahq", "deepfashion", "lsun_church"])
def test_paper_variant_differs_only_in_the_learning_rates(name):
  official, paper = _parse(f"--config={ROOT}/configs/{name}.py"), _parse(
      f"--config={ROOT}/configs/{name}.py:paper"
  )
  assert (official.train.lr, official.train.lr_diff_backbone) == (3e-6, 3e-6)
  assert (paper.train.lr, paper.train.lr_diff_backbone) == (3e-6, 1.5e-7)
  paper.train.lr_diff_backbone = official.train.lr_diff_backbone
  assert paper == official
