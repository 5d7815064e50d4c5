"""``python -m midms_jax.evaluate`` end to end on the shared synthetic training run: the report with
explicit placeholders where weights are absent, the translations' files, the same numbers from
``--generated_dir``, FID with its statistics cache (features stubbed: the Inception network is
tested in tests/metrics/test_inception.py), JPEG references as saved files decode, and one-line
errors."""

import json
import pathlib
import re

import numpy as np
import pytest

import configs
from configs import celebahq
from midms_jax import evaluate
from midms_jax.data import images
from midms_jax.metrics import inception, suite
from tests.conftest import FIXTURES

SYNTHETIC = pathlib.Path(configs.__file__).with_name("synthetic.py")
VGG = FIXTURES / "vgg19_small.pth"  # CoCosNet's VGG19 layout at the synthetic config's widths
SETTINGS = (
    f"--config={SYNTHETIC}",
    "--config.evaluate.max_examples=4",
    "--config.evaluate.diversity_conditions=2",
    "--config.evaluate.diversity_exemplars=3",
    "--config.evaluate.refine=False",
    "--config.evaluate.batch_size=4",
    f"--config.evaluate.vgg_checkpoint={VGG}",
)
SCORES = (
    "swd",
    "swd_levels",
    "lpips_diversity",
    "style_relevance_colour",
    "style_relevance_texture",
    "semantic_consistency",
)


@pytest.fixture(scope="module")
def evaluated(synthetic_run, tmp_path_factory):
  run, _ = synthetic_run
  out = tmp_path_factory.mktemp("evaluate") / "step_6"
  assert evaluate.run(["evaluate", f"--workdir={run}", f"--out={out}", *SETTINGS]) == 0
  return run, out, json.loads((out / "metrics.json").read_text())


def test_report_files_and_placeholders(evaluated):
  run, out, report = evaluated
  assert report["method"] == f"midms-jax {run} step 6" and report["step"] == 6
  assert report["data"] == dict(
      name="synthetic", split="validation", count=4, format="png", size=32
  )
  metrics = report["metrics"]
  assert (
      metrics["fid_sources"]
      == metrics["fid_exemplars"]
      == "weights absent: config.evaluate.inception_checkpoint is not set"
  )
  assert metrics["swd"] > 0 and len(metrics["swd_levels"]) == 2  # 32 and 16 pixel levels
  assert 0 < metrics["lpips_diversity"] < 1
  for name in ("style_relevance_colour", "style_relevance_texture", "semantic_consistency"):
    assert 0 < metrics[name] < 1, name
  assert sorted(p.name for p in (out / "images").glob("*.png")) == [
      f"00000{i}.png" for i in range(4)
  ]
  # 2 conditions x the easy exemplars of the 3 records after each
  assert sorted(p.stem for p in (out / "images" / "diversity").iterdir()) == [
      "000000__000001",
      "000000__000002",
      "000000__000003",
      "000001__000000",
      "000001__000002",
      "000001__000003",
  ]
  table = (out / "metrics.md").read_text()
  assert (
      f"| midms-jax {run} step 6 | synthetic validation, 4 images, PNG | n/a | n/a | "
      f"{metrics['swd']:.2f} |" in table
  )
  assert "- fid_sources: weights absent: config.evaluate.inception_checkpoint is not set" in table
  # TensorBoard, beside the run's own events
  assert list((run / "eval").glob("events.out.tfevents.*"))


def test_generated_dir_gives_the_same_numbers_and_fid_uses_its_cache(
    evaluated, tmp_path, monkeypatch
):
  _, out, report = evaluated
  # Stub Inception features (12 colour statistics per image) so that FID's path runs in seconds.
  monkeypatch.setattr(inception, "load_inception", lambda path: {"stub": np.zeros(1)})
  calls = []

  def features(variables, pixels, **_):
    calls.append(len(pixels))
    x = pixels.astype(np.float64) / 255
    return np.concatenate(
        [x.mean((1, 2)), x.std((1, 2)), x[:, :16].mean((1, 2)), x[:, 16:].mean((1, 2))], axis=1
    )

  monkeypatch.setattr(suite, "inception_features", features)
  args = [
      *SETTINGS,
      f"--config.evaluate.inception_checkpoint={VGG}",
      f"--generated_dir={out / 'images'}",
  ]
  assert evaluate.run(["evaluate", *args, f"--out={tmp_path / 'a'}"]) == 0
  again = json.loads((tmp_path / "a" / "metrics.json").read_text())
  assert again["method"] == str(out / "images") and again["step"] is None
  assert {k: again["metrics"][k] for k in SCORES} == {k: report["metrics"][k] for k in SCORES}
  fid = {k: again["metrics"][k] for k in ("fid_sources", "fid_exemplars")}
  assert all(isinstance(v, float) and v > 0 for v in fid.values()) and calls == [4, 4, 4]
  cached = sorted(p.name for p in (tmp_path / "a" / "fid_stats").iterdir())
  assert cached == [
      "synthetic-validation-exemplars-png-32px-4.npz",
      "synthetic-validation-sources-png-32px-4.npz",
  ]
  calls.clear()
  assert (
      evaluate.run(
          [
              "evaluate",
              *args,
              f"--out={tmp_path / 'b'}",
              f"--config.evaluate.stats_dir={tmp_path / 'a' / 'fid_stats'}",
          ]
      )
      == 0
  )
  cached_run = json.loads((tmp_path / "b" / "metrics.json").read_text())["metrics"]
  assert calls == [4] and {k: cached_run[k] for k in fid} == fid  # only the translations' features


def test_vgg_absent_and_no_diversity_are_explicit(evaluated, tmp_path):
  _, out, _ = evaluated
  args = [
      *SETTINGS,
      "--config.evaluate.vgg_checkpoint=",
      "--config.evaluate.diversity_exemplars=1",
      f"--generated_dir={out / 'images'}",
      f"--out={tmp_path}",
  ]
  assert evaluate.run(["evaluate", *args]) == 0
  metrics = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
  for name in ("style_relevance_colour", "style_relevance_texture", "semantic_consistency"):
    assert metrics[name] == "weights absent: config.evaluate.vgg_checkpoint is not set"
  assert metrics["lpips_diversity"].startswith("not computed: config.evaluate.diversity_conditions")


def test_jpeg_references_decode_as_saved_files(tmp_path):
  image = np.random.default_rng(0).uniform(-1, 1, (32, 32, 3)).astype(np.float32)
  images.save_image(tmp_path / "x.jpg", image, "jpg")
  saved = evaluate.saved_pixels(image, "jpg")
  assert np.array_equal(saved, images.read_rgb(tmp_path / "x.jpg"))
  # JPEG is lossy: the format changes the numbers
  assert not np.array_equal(saved, images.to_uint8(image))
  assert np.array_equal(evaluate.saved_pixels(image, "png"), images.to_uint8(image))


CONFIG = (f"--config={SYNTHETIC}", "--config.evaluate.max_examples=4")


@pytest.mark.parametrize(
    "args, message",
    [
        (CONFIG, "pass exactly one of --workdir"),
        (("--generated_dir={empty}",), "--generated_dir needs --config"),
        (
            (*CONFIG, "--generated_dir={empty}", "--out={empty}"),
            r"4 of the 4 translations are missing, e\.g\. 000000\.png",
        ),
        (
            (*CONFIG, "--generated_dir={empty}", "--out={empty}", "--format=jpg"),
            "files' format is used",
        ),
        (("--workdir={run}", "--step=5"), "no checkpoint for step 5"),
        (
            (f"--config={SYNTHETIC.with_name('celebahq.py')}:tiny", "--workdir={run}"),
            "is a celebahq config but the workdir's model was trained on synthetic",
        ),
        ((*CONFIG, "--midms_checkpoint=x.pth"), "--midms_checkpoint needs --out"),
        (
            ("--workdir={run}", "--config.evaluate.inception_checkpoint=/nowhere/pt_inception.pth"),
            r"^error: --config\.evaluate\.inception_checkpoint=/nowhere/pt_inception\.pth: no "
            r"such file "
            r"\(pass",
        ),
        (
            (*CONFIG, "--workdir={run}", "--config.loss.vgg_checkpoint=/nowhere/vgg19_conv.pth"),
            r"^error: --config\.loss\.vgg_checkpoint=/nowhere/vgg19_conv\.pth: no such file",
        ),
        (
            ("--workdir={run}", "--config.evaluate.nonexistent=1"),
            r"^error: --config\.evaluate\.nonexistent: config has no field 'nonexistent' in "
            r"evaluate$",
        ),
        (
            ("--config=/nowhere/config.py", "--workdir={run}"),
            r"^error: --config=/nowhere/config\.py: no such config file$",
        ),
        (
            ("--workdir={run}", "--out={empty}/a_file/out"),
            r"a_file/out: cannot write --out there: .*a_file is a file",
        ),
        (
            ("--generated_dir={empty}", "--config.evaluate.max_examples=4"),
            r"^error: --config\.evaluate\.max_examples: an override needs --config",
        ),
    ],
    ids=[
        "no-source",
        "no-config",
        "missing-files",
        "format",
        "step",
        "other-data-set",
        "no-out",
        "inception-typo",
        "vgg-typo",
        "unknown-field",
        "missing-config",
        "unwritable-out",
        "override-without-config",
    ],
)
def test_bad_input_is_one_line_and_status_2(synthetic_run, tmp_path, capsys, args, message):
  run, _ = synthetic_run
  (tmp_path / "a_file").write_text("not a folder")
  assert evaluate.run(["evaluate", *(a.format(run=run, empty=tmp_path) for a in args)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and re.search(message, err[0]), err
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # nothing written


def test_workdir_config_takes_overrides_without_config(synthetic_run, tmp_path):
  """Without --config the run's config.json is the config, and --config.<field> overrides apply to
  it."""
  run, _ = synthetic_run
  assert (
      evaluate.run(
          [
              "evaluate",
              f"--workdir={run}",
              f"--out={tmp_path}",
              "--config.evaluate.max_examples=2",
              "--config.evaluate.diversity_exemplars=1",
              "--config.evaluate.swd.min_resolution=32",
          ]
      )
      == 0
  )
  report = json.loads((tmp_path / "metrics.json").read_text())
  assert report["data"]["count"] == 2 and len(report["metrics"]["swd_levels"]) == 1  # the overrides
  assert report["metrics"]["style_relevance_colour"] == (
      "weights absent: config.evaluate.vgg_checkpoint is not set"
  )


def test_translations_run_through_the_shared_inference_function(monkeypatch):
  """evaluate translates with ``inference.compiled`` (the inference loop, one key scheme)."""
  calls = []
  monkeypatch.setattr(
      evaluate.inference,
      "compiled",
      lambda config, refine, *rest: calls.append(refine)
      or (None, lambda variables, *pairs: {"image": pairs[0][..., :3]}),
  )
  config = celebahq.get_config("tiny")
  translator = evaluate.Translator(config, {})
  assert calls == [bool(config.evaluate.refine)]
  key = translator.key(1, 4, 7)
  np.testing.assert_array_equal(key, evaluate.inference.pair_key(config.evaluate.seed, 1, 4, 7))
  conditions = np.zeros((3, 8, 8, 15), np.float32)
  assert translator(
      conditions, conditions[..., :3], conditions, np.zeros((3, 2), np.uint32)
  ).shape == (3, 8, 8, 3)
