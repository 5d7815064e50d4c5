"""``python -m midms_jax.data.prepare``: builds a fake data set, prints the summary, keeps a
prepared one, one ``error:`` line and exit status 2 for bad input, ``--skip_bad`` lists what it
skipped."""

import subprocess
import sys

import numpy as np
import pytest

from configs import celebahq, lsun_church
from midms_jax.data import fake_layouts, pipeline, prepare
from tests.data.test_builders import write_celebahq, write_lsun


def _run(capsys, *flags: str) -> tuple[int, str, str]:
  status = prepare.run(["prepare", *flags])
  out, err = capsys.readouterr()
  return status, out, err


def _error_line(err: str) -> str:
  lines = [line for line in err.splitlines() if line.startswith("error:")]
  assert len(lines) == 1, err
  return lines[0]


def test_prepare_summary_reuse_and_overwrite(tmp_path, capsys):
  manual_dir, data_dir = write_celebahq(tmp_path / "celeba").root, tmp_path / "tfds"
  flags = ("--dataset=celebahq", f"--manual_dir={manual_dir}", f"--data_dir={data_dir}")
  status, out, _ = _run(capsys, *flags)
  assert status == 0
  assert f"prepared celebahq 1.0.0 in {data_dir / 'celebahq' / '1.0.0'}" in out
  assert (
      "  train             4 records\n  validation        2 records\n  exemplars         1 records"
      in out
  )
  assert "skipped" not in out
  data_cfg = celebahq.get_config("tiny").data
  data_cfg.data_dir = str(data_dir)
  assert len(pipeline.make_source(data_cfg, "validation")) == 2

  (manual_dir / "val.txt").write_text("2001\n")
  status, out, _ = _run(capsys, *flags)  # kept as it is
  assert status == 0 and "already prepared (pass --overwrite to rebuild it): celebahq" in out
  assert "validation        2 records" in out
  status, out, _ = _run(capsys, *flags, "--overwrite")
  assert status == 0 and "validation        1 records" in out


def test_skip_bad_lists_the_skipped_files(tmp_path, capsys):
  manual_dir, data_dir = write_celebahq(tmp_path / "celeba").root, tmp_path / "tfds"
  bad = manual_dir / "CelebA-HQ-img" / "2.jpg"
  bad.write_bytes(b"not a jpeg")
  flags = ("--dataset=celebahq", f"--manual_dir={manual_dir}", f"--data_dir={data_dir}")
  status, out, err = _run(capsys, *flags)
  assert status == 2 and _error_line(err).startswith(
      f"error: {bad}: not a readable image (corrupt or truncated?)"
  )
  assert not (data_dir / "celebahq" / "1.0.0").exists()
  status, out, _ = _run(capsys, *flags, "--skip_bad")
  assert status == 0
  assert "  train             2 records" in out and "skipped 2 record(s):\n" in out
  assert (
      f"  train: {manual_dir / 'celebahq_ref.txt'}:2: exemplar 2.jpg of 1.jpg: {bad}: not a "
      "readable image" in out
  )
  assert f"  train: {bad}: not a readable image" in out
  status, out, _ = _run(capsys, *flags)  # the summary of a prepared data set still lists them
  assert status == 0 and "skipped 2 record(s):" in out


def test_lsun_label_150_is_the_dont_care_channel(tmp_path, capsys):
  """A validation label map holding a 20 x 20 square of id 150 (the official loader's don't-care
  class, which 255 is mapped to) prepares, and the one-hot channel 150 is set there."""
  key = "validation/val1.jpg"
  fake = fake_layouts.write_lsun_church(tmp_path / "lsun", label_patches={key: 150})
  ids = fake.condition_inputs[key]
  assert (ids[:20, :20] == 150).all() and (ids == 150).sum() == 400
  status, out, err = _run(
      capsys,
      "--dataset=lsun_church",
      f"--manual_dir={fake.root}",
      f"--data_dir={tmp_path / 'tfds'}",
  )
  assert status == 0, err
  assert "  validation        2 records" in out and "skipped" not in out
  data_cfg = lsun_church.get_config("tiny").data
  data_cfg.update(dict(data_dir=str(tmp_path / "tfds"), eval_load_size=40))
  label = pipeline.make_source(data_cfg, "validation")[0]["label"]  # val1: record 0
  assert label.shape == (40, 40, 151)
  np.testing.assert_array_equal(label[:20, :20, 150], 1.0)
  np.testing.assert_array_equal(label.sum(-1), 1.0)
  np.testing.assert_array_equal(np.argmax(label, -1), np.where(ids == 255, 150, ids))


def test_skip_bad_reports_label_ids_without_a_channel(tmp_path, capsys):
  """Id 151 has no one-hot channel: one error line naming the label map; --skip_bad lists the record
  and the one that uses it as its exemplar."""
  patches = {"training/img3.jpg": 151, "validation/val1.jpg": 150}
  fake = fake_layouts.write_lsun_church(tmp_path / "lsun", label_patches=patches)
  label = fake.root / "training" / "img3.png"
  flags = ("--dataset=lsun_church", f"--manual_dir={fake.root}", f"--data_dir={tmp_path / 'tfds'}")
  problem = f"{label}: label ids must be 0..150 or 255 (read as 150, don't care), found 151"
  status, _, err = _run(capsys, *flags)
  assert status == 2 and _error_line(err) == f"error: {problem}"
  status, out, _ = _run(capsys, *flags, "--skip_bad")
  assert status == 0
  assert "  train             1 records\n  validation        2 records\n" in out
  ref_list = fake.root / "lsun_church_ref.txt"
  assert (
      f"skipped 2 record(s):\n"
      f"  train: {ref_list}:2: exemplar img3.jpg of img2.jpg: {problem}\n"
      f"  train: {problem}\n"
      "note: records after a skipped one have lower indices than in the official data"
  ) in out


@pytest.mark.parametrize(
    "flags, expected",
    [
        (("--dataset=celebahq",), "error: --dataset and --manual_dir are required"),
        (
            ("--dataset=cityscapes", "--manual_dir=x"),
            "error: flag --dataset=cityscapes: value should be one of",
        ),
        (
            ("--dataset=celebahq", "--manual_dir={tmp}/nowhere"),
            "error: {tmp}/nowhere: no such folder (--manual_dir: the celebahq folder in the "
            "official layout)",
        ),
        (
            ("--dataset=lsun_church", "--manual_dir={tmp}/lsun", "--ref_list={tmp}/lists/ref.txt"),
            "error: {tmp}/lists/ref.txt: no such file (the train exemplar list; pass its path "
            "with --ref_list)",
        ),
        (
            ("--dataset=celebahq", "--manual_dir={tmp}/lsun"),
            "error: {tmp}/lsun/train.txt: no such file",
        ),
        (
            ("--dataset=celebahq", "--manual_dir={tmp}/empty"),
            "error: {tmp}/empty: empty folder (--manual_dir: the celebahq folder in the official "
            "layout, "
            "holding train.txt, val.txt, CelebA-HQ-img/ and CelebAMask-HQ-mask-anno/)",
        ),
        (
            ("--dataset=lsun_church", "--manual_dir={tmp}/a_file"),
            "error: {tmp}/a_file: not a folder (--manual_dir: the lsun_church folder in the "
            "official "
            "layout)",
        ),
    ],
)
def test_bad_input_gives_one_error_line(tmp_path, capsys, flags, expected):
  write_lsun(tmp_path / "lsun")
  (tmp_path / "empty").mkdir()
  (tmp_path / "a_file").write_text("not a folder")
  status, _, err = _run(
      capsys, *(flag.format(tmp=tmp_path) for flag in flags), f"--data_dir={tmp_path / 'tfds'}"
  )
  assert status == 2
  assert _error_line(err).startswith(expected.format(tmp=tmp_path)), err
  assert err.count("\n") == 1, err
  assert not (tmp_path / "tfds").exists()


def test_unwritable_data_dir_is_one_line_before_any_work(tmp_path, capsys):
  manual_dir = write_lsun(tmp_path / "lsun").root
  (tmp_path / "a_file").write_text("not a folder")
  status, out, err = _run(
      capsys,
      "--dataset=lsun_church",
      f"--manual_dir={manual_dir}",
      f"--data_dir={tmp_path / 'a_file' / 'tfds'}",
  )
  assert status == 2 and out == ""
  a_file = tmp_path / "a_file"
  assert err == (
      f"error: {a_file / 'tfds'}: cannot write --data_dir there: {a_file} is a file, "
      "not a folder\n"
  )


def test_module_entry_point(tmp_path):
  """The documented command, in a fresh interpreter, with exemplar lists elsewhere than the data."""
  manual_dir = write_lsun(tmp_path / "lsun").root
  lists = tmp_path / "lists"
  lists.mkdir()
  for name in ("lsun_church_ref.txt", "lsun_church_ref_test.txt"):
    (manual_dir / name).rename(lists / name)
  result = subprocess.run(
      [
          sys.executable,
          "-m",
          "midms_jax.data.prepare",
          "--dataset=lsun_church",
          f"--manual_dir={manual_dir}",
          f"--data_dir={tmp_path / 'tfds'}",
          f"--ref_list={lists / 'lsun_church_ref.txt'}",
          f"--ref_test_list={lists / 'lsun_church_ref_test.txt'}",
      ],
      capture_output=True,
      text=True,
      timeout=120,
      check=False,
  )
  assert result.returncode == 0, result.stderr
  assert "  train             3 records\n  validation        2 records\n" in result.stdout
  # stderr is not a terminal: a plain line per stage, none of the progress bars' cursor movements
  assert result.stderr.splitlines() == [
      "checking lsun_church files: 5 images",
      "writing lsun_church train: 3 records",
      "writing lsun_church validation: 2 records",
  ], result.stderr
