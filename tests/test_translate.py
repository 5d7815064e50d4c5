"""``python -m midms_jax.translate`` with the tiny CelebA-HQ config and the official small
checkpoint.

The CLI runs in-process (``translate.run``) so that its jitted translation compiles once per batch
size for the whole module; one test runs the real ``python -m`` in a subprocess.
"""

import os
import pathlib
import re
import subprocess
import sys
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from skimage import data

from configs import celebahq, lsun_church
from midms_jax import inference, translate
from midms_jax.data import conditions, images
from midms_jax.interop import torch_import
from midms_jax.midms.model import MIDMs
from tests.conftest import FIXTURES

pytest.importorskip("torch")

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = f"--config={REPO}/configs/celebahq.py:tiny"
CHECKPOINT = FIXTURES / "midms_small.pth"
SIZE = 32


def _photo(path: pathlib.Path, name: str) -> pathlib.Path:
  Image.fromarray(getattr(data, name)()[..., :3]).resize((SIZE, SIZE), Image.BICUBIC).save(path)
  return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """Two condition photos and two exemplar photos, 32x32, in their own folders."""
  root = tmp_path_factory.mktemp("translate")
  (root / "conditions").mkdir()
  (root / "exemplars").mkdir()
  return dict(
      root=root,
      c0=_photo(root / "conditions" / "c0.png", "astronaut"),
      c1=_photo(root / "conditions" / "c1.jpg", "coffee"),
      e0=_photo(root / "exemplars" / "e0.jpg", "chelsea"),
      e1=_photo(root / "exemplars" / "e1.png", "rocket"),
  )


def _run(*args, checkpoint=CHECKPOINT, config=CONFIG) -> int:
  argv = (
      ["translate", config]
      + ([f"--midms_checkpoint={checkpoint}"] if checkpoint else [])
      + list(args)
  )
  return translate.run(argv)


def _pixels(path) -> np.ndarray:
  with Image.open(path) as image:
    return np.asarray(image)


@pytest.fixture(scope="module")
def single(files):
  """The pair (c0, e0) translated with seed 0 in single-file mode."""
  out = files["root"] / "single" / "seed0.png"
  assert _run(f"--condition={files['c0']}", f"--exemplar={files['e0']}", f"--output={out}") == 0
  return out


def test_single_pair_is_reproducible_and_seeded(files, single):
  again, other = files["root"] / "single" / "again.png", files["root"] / "single" / "seed1.png"
  pair = (f"--condition={files['c0']}", f"--exemplar={files['e0']}")
  assert _run(*pair, f"--output={again}", "--seed=0") == 0
  assert _run(*pair, f"--output={other}", "--seed=1") == 0
  with Image.open(single) as image:
    assert image.format == "PNG" and image.mode == "RGB" and image.size == (SIZE, SIZE)
  assert single.read_bytes() == again.read_bytes()
  assert np.abs(_pixels(single).astype(int) - _pixels(other)).mean() > 1


def test_output_equals_midms_translate(files, single):
  config = celebahq.get_config("tiny")
  model = MIDMs.from_config(config)
  variables = jax.tree_util.tree_map(
      jnp.asarray, torch_import.load_midms_checkpoint(CHECKPOINT, config.model)
  )
  condition = conditions.load_condition(files["c0"], config)
  exemplar = images.load_image(files["e0"])
  exemplar_condition = conditions.load_condition(files["e0"], config)
  key = jax.random.fold_in(jax.random.PRNGKey(0), zlib.crc32(b"c0__e0"))
  np.testing.assert_array_equal(inference.pair_key(0, inference.name_id("c0__e0")), key)
  fn = jax.jit(lambda v, c, e, ec, k: model.translate(v, c, e, ec, k)["image"])
  expected = images.to_uint8(
      fn(variables, condition[None], exemplar[None], exemplar_condition[None], key)[0]
  )
  diff = np.abs(_pixels(single).astype(int) - expected)
  # float rounding of the vmapped batch at .5 boundaries
  assert diff.max() <= 1 and np.mean(diff > 0) < 0.01
  assert expected.std() > 1


def test_a_model_trained_with_another_loop_translates_with_the_inference_loop(files, single):
  """Training at n = 5 (20 DDIM steps, 5 loop steps from 15) leaves the translation as it was:
  translate runs config.midms.inference (the official 16 / 4 loop); changing that changes the
  picture."""
  out, other = (
      files["root"] / "single" / "trained_n5.png",
      files["root"] / "single" / "inference_n5.png",
  )
  pair = (f"--condition={files['c0']}", f"--exemplar={files['e0']}")
  n5 = (
      "--config.midms.ddim_steps=20",
      "--config.midms.interleave_steps=5",
      "--config.midms.loop_start_step=15",
  )
  assert _run(*pair, f"--output={out}", *n5) == 0
  assert out.read_bytes() == single.read_bytes()
  inference_n5 = [f.replace("midms.", "midms.inference.") for f in n5]
  assert _run(*pair, f"--output={other}", *inference_n5) == 0
  assert np.abs(_pixels(other).astype(int) - _pixels(single)).mean() > 1


def test_folder_mode_and_resume(files, single, capsys):
  out = files["root"] / "folder"
  args = (
      f"--condition={files['root'] / 'conditions'}",
      f"--exemplar={files['root'] / 'exemplars'}",
      f"--output={out}",
      "--batch_size=3",
  )
  assert _run(*args) == 0
  names = sorted(p.name for p in out.iterdir())
  assert names == ["c0__e0.png", "c0__e1.png", "c1__e0.png", "c1__e1.png"]
  assert "skipping 0" in capsys.readouterr().out
  # The pair's key depends on its name only: folder mode (batch of 3, padded) matches single-file
  # mode.
  assert np.abs(_pixels(out / "c0__e0.png").astype(int) - _pixels(single)).max() <= 1
  before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
  assert _run(*args) == 0
  assert "skipping 4 already in" in capsys.readouterr().out
  assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()} == before
  (out / "c1__e0.png").unlink()
  assert _run(*args) == 0
  assert "skipping 3 already in" in capsys.readouterr().out
  assert (out / "c1__e0.png").read_bytes() == before["c1__e0.png"][1]


def test_folder_mode_reports_a_corrupt_file_and_writes_the_others(files, capsys):
  folder = files["root"] / "with_corrupt"
  folder.mkdir()
  (folder / "broken.png").write_bytes(files["c0"].read_bytes()[:100])
  (folder / "c0.png").write_bytes(files["c0"].read_bytes())
  (folder / "notes.txt").write_text("not an input")
  out = files["root"] / "corrupt_out"
  exemplars = files["root"] / "exemplars.txt"
  exemplars.write_text("# exemplars\nexemplars/e0.jpg\n\nexemplars/e1.png\n")
  args = (f"--condition={folder}", f"--exemplar={exemplars}", f"--output={out}", "--batch_size=3")
  assert _run(*args) == 0
  assert sorted(p.name for p in out.iterdir()) == ["c0__e0.png", "c0__e1.png"]
  err = capsys.readouterr().err
  assert err.count(f"error: {folder / 'broken.png'}: not a readable image") == 1
  (folder / "c0.png").unlink()
  assert _run(*args) == 2  # nothing could be translated
  assert "broken.png" in capsys.readouterr().err


def test_debug_grid(files):
  out = files["root"] / "debug" / "pair.png"
  assert (
      _run(f"--condition={files['c0']}", f"--exemplar={files['e0']}", f"--output={out}", "--debug")
      == 0
  )
  grid = _pixels(out.with_name("pair_debug.png"))
  tiles = 1 + 3 * len(celebahq.get_config("tiny").midms.rewarp_steps) + 1
  assert grid.shape == (SIZE, SIZE * tiles, 3)
  np.testing.assert_array_equal(grid[:, -SIZE:], _pixels(out))
  for k in (0, 1):  # the masks: gray 0/255, constant on each 4x4 latent pixel
    mask = grid[:, SIZE * (3 + 3 * k) : SIZE * (4 + 3 * k)]
    assert set(np.unique(mask)) <= {0, 255} and (mask == mask[..., :1]).all()
    np.testing.assert_array_equal(mask, np.repeat(np.repeat(mask[::4, ::4], 4, 0), 4, 1))


def test_jpg_output(files):
  out = files["root"] / "jpg"
  assert (
      _run(
          f"--condition={files['c1']}",
          f"--exemplar={files['e1']}",
          f"--output={out}",
          "--format=jpg",
      )
      == 0
  )
  single = files["root"] / "jpg_single.jpg"
  assert _run(f"--condition={files['c1']}", f"--exemplar={files['e1']}", f"--output={single}") == 0
  for path in (out / "c1__e1.jpg", single):
    with Image.open(path) as image:
      assert image.format == "JPEG" and image.size == (SIZE, SIZE)
  # flags of earlier in-process runs (--debug) reset
  assert [p.name for p in out.iterdir()] == ["c1__e1.jpg"]


def _bad_inputs(root: pathlib.Path, c0: pathlib.Path) -> dict[str, tuple[pathlib.Path, list[str]]]:
  """name -> (file named in the message, extra CLI args)."""
  rgb = np.asarray(Image.open(c0))
  Image.fromarray(rgb).convert("L").save(root / "gray.png")
  Image.fromarray(rgb).convert("RGBA").save(root / "rgba.png")
  Image.fromarray(rgb).convert("P").save(root / "palette.png")
  Image.fromarray(rgb).resize((36, 36)).save(root / "odd.png")
  (root / "corrupt.jpg").write_bytes(c0.read_bytes()[:80])
  np.save(root / "c14.npy", np.zeros((SIZE, SIZE, 14), np.float32))
  (root / "bad.pth").write_bytes(b"not a checkpoint")
  ex = f"--exemplar={c0}"
  return {
      "missing": (root / "missing.png", [f"--condition={root / 'missing.png'}", ex]),
      "corrupt": (root / "corrupt.jpg", [f"--condition={root / 'corrupt.jpg'}", ex]),
      "grayscale": (root / "gray.png", [f"--condition={c0}", f"--exemplar={root / 'gray.png'}"]),
      "rgba": (root / "rgba.png", [f"--condition={c0}", f"--exemplar={root / 'rgba.png'}"]),
      "palette": (
          root / "palette.png",
          [f"--condition={c0}", f"--exemplar={root / 'palette.png'}"],
      ),
      "size": (root / "odd.png", [f"--condition={root / 'odd.png'}", ex]),
      "channels": (root / "c14.npy", [f"--condition={root / 'c14.npy'}", ex]),
      "exemplar_condition": (
          root / "c14.npy",
          [f"--condition={c0}", ex, f"--exemplar_condition={root / 'c14.npy'}"],
      ),
      "checkpoint": (
          root / "bad.pth",
          [f"--condition={c0}", ex, f"--midms_checkpoint={root / 'bad.pth'}"],
      ),
      "no_checkpoint": (
          root / "nope.pth",
          [f"--condition={c0}", ex, f"--midms_checkpoint={root / 'nope.pth'}"],
      ),
  }


BAD = [
    "missing",
    "corrupt",
    "grayscale",
    "rgba",
    "palette",
    "size",
    "channels",
    "exemplar_condition",
    "checkpoint",
    "no_checkpoint",
]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_exits_2_with_one_line(files, capsys, case):
  root = files["root"] / "bad"
  root.mkdir(exist_ok=True)
  named, args = _bad_inputs(root, files["c0"])[case]
  assert _run(*args, f"--output={root / 'out.png'}") == 2
  err = capsys.readouterr().err
  assert err.startswith(f"error: {named}: ") and err.count("\n") == 1, err
  assert not (root / "out.png").exists()


def test_usage_errors_exit_2(files, capsys):
  assert _run(f"--exemplar={files['e0']}", f"--output={files['root'] / 'u.png'}") == 2
  assert capsys.readouterr().err == "error: --condition is required\n"
  assert _run("--no_such_flag=1") == 2
  assert "no_such_flag" in capsys.readouterr().err
  assert (
      _run(
          f"--condition={files['c0']}",
          f"--exemplar={files['e0']}",
          f"--output={files['root'] / 'x.gif'}",
      )
      == 2
  )
  gif = files["root"] / "x.gif"
  assert (
      capsys.readouterr().err
      == f"error: {gif}: in single-file mode --output must be a .png or .jpg file\n"
  )
  lsun = f"--config={REPO}/configs/lsun_church.py:tiny"
  assert (
      _run(
          f"--condition={files['c0']}",
          f"--exemplar={files['e0']}",
          f"--output={files['root'] / 'u.png'}",
          config=lsun,
      )
      == 2
  )
  assert "pass --exemplar_condition" in capsys.readouterr().err
  pair = [
      f"--condition={files['c0']}",
      f"--exemplar={files['e0']}",
      f"--output={files['root'] / 'u.png'}",
  ]
  runs = files["root"] / "runs"
  cases = [
      (
          dict(),
          [f"--workdir={runs}"],
          "--workdir and --midms_checkpoint exclude each other: pick one source of weights",
      ),
      (dict(), ["--step=3"], "--step needs --workdir (it picks a checkpoint of a training run)"),
      (
          dict(checkpoint=None),
          [f"--workdir={runs}"],
          "--workdir and --config exclude each other: the workdir's config.json is the model's "
          "config",
      ),
      (dict(checkpoint=None, config=f"--workdir={runs}"), [], f"{runs}: no such training workdir"),
  ]
  for kwargs, args, message in cases:
    assert _run(*pair, *args, **kwargs) == 2
    assert capsys.readouterr().err == f"error: {message}\n"


def test_python_dash_m_subprocess(files, single):
  """The real entry point, with --no_refine (otherwise untested: the output must differ from the
  refined one)."""
  out = files["root"] / "subprocess.png"
  env = dict(
      os.environ,
      PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
  )
  cmd = [
      sys.executable,
      "-m",
      "midms_jax.translate",
      CONFIG,
      f"--midms_checkpoint={CHECKPOINT}",
      f"--condition={files['c0']}",
      f"--exemplar={files['e0']}",
      f"--output={out}",
      "--no_refine",
  ]
  done = subprocess.run(
      cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False
  )
  assert done.returncode == 0, done.stderr
  assert "Traceback" not in done.stderr and done.stdout.strip() == f"wrote {out}"
  unrefined = _pixels(out)
  assert (
      unrefined.shape == (SIZE, SIZE, 3)
      and np.abs(unrefined.astype(int) - _pixels(single)).mean() > 1
  )


def _one_error_line(capsys) -> str:
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("error: "), err
  return err.strip()


@pytest.mark.parametrize(
    "config, args, message",
    [
        (
            f"--config={REPO}/configs/nope.py",
            [],
            f"error: --config={REPO}/configs/nope.py: no such config file",
        ),
        (
            CONFIG,
            ["--config.train.nonexistent=1"],
            "error: --config.train.nonexistent: config has no field 'nonexistent' in train",
        ),
        (
            "--seed=0",
            ["--config.train.nonexistent=1"],  # no --config: the default config's fields
            "error: --config.train.nonexistent: config has no field 'nonexistent' in train",
        ),
        (
            CONFIG,
            ["--config.attention_chunk=-1"],
            "error: the config: config.attention_chunk must be >= 0",
        ),
    ],
    ids=["missing-file", "unknown-field", "unknown-field-default-config", "bad-value"],
)
def test_config_errors_exit_2_with_one_line(files, capsys, config, args, message):
  out = files["root"] / "config_errors" / "out.png"
  assert (
      _run(
          f"--condition={files['c0']}",
          f"--exemplar={files['e0']}",
          f"--output={out}",
          *args,
          config=config,
      )
      == 2
  )
  assert _one_error_line(capsys).startswith(message)
  assert not out.exists()


def test_unwritable_output_exits_2_with_one_line(files, capsys):
  blocker = files["root"] / "a_file"  # a path under a file: unwritable for root too (chmod is not)
  blocker.write_text("not a folder")
  pair = (f"--condition={files['c0']}", f"--exemplar={files['e0']}")
  for output in (blocker / "out.png", blocker / "results"):  # single-file and folder mode
    assert _run(*pair, f"--output={output}") == 2
    assert _one_error_line(capsys) == (
        f"error: {output}: cannot write --output there: {blocker} " "is a file, not a folder"
    )
  assert (
      _run(
          f"--condition={files['root'] / 'conditions'}",
          f"--exemplar={files['e0']}",
          f"--output={blocker}",
      )
      == 2
  )
  assert _one_error_line(capsys) == (
      f"error: {blocker}: in folder mode --output is a folder, not " "an image file"
  )
  assert blocker.read_text() == "not a folder"


def test_a_pair_too_large_for_memory_is_refused_before_compiling(files, capsys, monkeypatch):
  """2048x2048: the first stage's attention alone would need 550 GB: refused in seconds, nothing
  compiled."""
  big = files["root"] / "big.png"
  Image.fromarray(np.asarray(Image.open(files["c0"]).resize((2048, 2048)))).save(big)
  monkeypatch.setattr(inference, "compiled", lambda *_: pytest.fail("compiled"))
  out = files["root"] / "big_out.png"
  assert _run(f"--condition={big}", f"--exemplar={big}", f"--output={out}") == 2
  line = _one_error_line(capsys)
  assert line.startswith(
      f"error: {big} with {big}: size 2048x2048 needs at least 550.3 GB to "
      "translate (first-stage attention 550.3 GB, correlation volume 274.9 GB, "
      "U-Net attention"
  ), line
  assert re.search(
      r"more than the [\d.]+ [GT]B (available|free) host memory; try images of at " r"most \d+x\d+",
      line,
  )
  assert not out.exists()
  # The ways out that would fit: a batch of one; the chunk options where the U-Net attention
  # dominates (LSUN).
  monkeypatch.setattr(translate, "memory_limit", lambda: (400_000_000, "free on a test device"))
  problem = translate.MemoryCheck(celebahq.get_config(), batch_size=8).problem(256, 256)
  assert "needs at least 1.3 GB for a batch of 8" in problem
  assert "400.0 MB free on a test device" in problem
  assert problem.endswith("try --batch_size=1 or images of at most 160x160 (resize both)"), problem
  assert translate.MemoryCheck(celebahq.get_config(), batch_size=1).problem(256, 256) is None
  problem = translate.MemoryCheck(lsun_church.get_config(), batch_size=1).problem(512, 512)
  assert "U-Net attention 536.9 MB" in problem
  assert "try --config.midms.warp_chunk=1024 --config.attention_chunk=256 or images of" in problem


def test_memory_estimate_terms_and_options():
  config = celebahq.get_config()  # 256x256 images, 64x64 latents
  estimate = translate.memory_estimate(config, 256, 256)
  latent = 64 * 64
  assert estimate.correlation == latent**2 * 4
  assert estimate.first_stage == (2 * latent**2 + 256 * 256 * 128) * 4
  assert estimate.attention == 14 * (32 * 32) ** 2 * 4  # 448 channels / 32 per head, 32x32 tokens
  assert translate.memory_estimate(config, 256, 256, batch=3).total == 3 * estimate.total
  with config.unlocked():
    config.midms.warp_chunk, config.attention_chunk = 1024, 256
  chunked = translate.memory_estimate(config, 256, 256)
  assert chunked.correlation == 1024 * latent * 4 and chunked.attention == 14 * 256 * 1024 * 4
  assert chunked.first_stage == estimate.first_stage  # the first stage has no such option


def test_memory_estimate_is_below_xlas_own_analysis():
  """At 128x128 the tiny model's XLA temporaries are 10.5 MB, the estimate 10.49 MB (the first
  stage's attention): a lower bound, so the check never refuses what fits."""
  config = celebahq.get_config("tiny")
  _, translate_pairs = inference.compiled(config, refine=True)
  variables = jax.eval_shape(lambda: torch_import.load_midms_checkpoint(CHECKPOINT, config.model))
  condition = jax.ShapeDtypeStruct((1, 128, 128, config.data.label_nc), jnp.float32)
  exemplar = jax.ShapeDtypeStruct((1, 128, 128, 3), jnp.float32)
  keys = jax.ShapeDtypeStruct((1, 2), jnp.uint32)
  compiled = translate_pairs.lower(variables, condition, exemplar, condition, keys).compile()
  xla = compiled.memory_analysis().temp_size_in_bytes
  estimate = translate.memory_estimate(config, 128, 128).total
  assert 0.9 * xla <= estimate <= xla, (estimate, xla)
