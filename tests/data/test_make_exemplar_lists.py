"""Exemplar lists: nearest neighbours of altered photo copies, the official file format, ties, bad
input, CLI."""

import io
import pathlib
import shutil

import numpy as np
import pytest
from PIL import Image
from skimage import data

import configs.base
from midms_jax.data import fake_layouts, images, make_exemplar_lists as mel, prepare
from midms_jax.errors import InputError
from midms_jax.models import vgg

FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures"
VGG_FILE = FIXTURES / "vgg19_small.pth"
WIDTHS = configs.base.tiny_vgg_widths()
SIDE, FEATURE_SIZE = 64, 32


def _square(pixels: np.ndarray) -> np.ndarray:
  return np.asarray(Image.fromarray(pixels).resize((SIDE, SIDE), Image.Resampling.BICUBIC))


def _jpeg(pixels: np.ndarray) -> np.ndarray:
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, "JPEG", quality=60)
  return np.asarray(Image.open(buffer))


def _cropped(pixels: np.ndarray) -> np.ndarray:
  height, width = pixels.shape[:2]
  return _square(pixels[height // 20 : -(height // 20), width // 20 : -(width // 20)])


def _brighter(pixels: np.ndarray) -> np.ndarray:
  return np.clip(pixels.astype(np.float32) * 0.85 + 20, 0, 255).astype(np.uint8)


# photo -> (pixels, an altered copy)
PHOTOS = {
    "astronaut": (data.astronaut, lambda p: _brighter(_square(p))),
    "coffee": (data.coffee, _cropped),
    "chelsea": (data.chelsea, lambda p: _jpeg(_square(p))),
    "rocket": (data.rocket, lambda p: _brighter(_square(p))),
    "ihc": (data.immunohistochemistry, _cropped),
    "motorcycle": (lambda: data.stereo_motorcycle()[0], lambda p: _jpeg(_square(p))),
}
FIELDS = {"red": (255, 0, 0), "sky": (0, 128, 255), "leaf": (40, 200, 40)}


@pytest.fixture(scope="module")
def variables():
  return vgg.load_vgg19(VGG_FILE, WIDTHS)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> pathlib.Path:
  """6 photos, an altered copy of each (``<photo>_copy.png``), 3 colour fields: 15 images."""
  root = tmp_path_factory.mktemp("images")
  for name, (load, alter) in PHOTOS.items():
    pixels = load()
    Image.fromarray(_square(pixels)).save(root / f"{name}.png")
    Image.fromarray(alter(pixels)).save(root / f"{name}_copy.jpg", quality=95)
  for name, colour in FIELDS.items():
    Image.fromarray(np.full((SIDE, SIDE, 3), colour, np.uint8)).save(root / f"{name}.png")
  return root


def _lists(entries, output, variables, **kwargs) -> dict[str, list[str]]:
  options = dict(widths=WIDTHS, top_k=5, image_size=FEATURE_SIZE, batch_size=4) | kwargs
  mel.make_exemplar_lists(entries, output, variables=variables, **options)
  return mel.read_list(output)


def test_altered_copy_and_photo_are_nearest_neighbours(folder, variables, tmp_path):
  lists = _lists(mel.list_images(folder), tmp_path / "ref.txt", variables)
  for name in PHOTOS:
    assert lists[f"{name}_copy.jpg"][0] == f"{name}.png"
    assert lists[f"{name}.png"][0] == f"{name}_copy.jpg"


def test_format_official_lines_never_self(folder, variables, tmp_path):
  output = tmp_path / "ref.txt"
  lists = _lists(mel.list_images(folder), output, variables, top_k=7)
  text = output.read_text()
  names = sorted(p.name for p in folder.iterdir())
  assert text.endswith("\n") and " " not in text and "\r" not in text
  lines = text.splitlines()
  assert [line.split(",")[0] for line in lines] == [e.name for e in mel.list_images(folder)]
  assert sorted(lists) == names and len(lines) == len(names)
  for key, candidates in lists.items():
    assert len(candidates) == 7 and len(set(candidates)) == 7
    assert key not in candidates and set(candidates) <= set(names)


def test_natural_order_of_lines():
  names = ["10.jpg", "9.jpg", "a2.png", "a10.png", "100.jpg"]
  assert sorted(names, key=images.natural_key) == [
      "9.jpg",
      "10.jpg",
      "100.jpg",
      "a2.png",
      "a10.png",
  ]


def test_top_k_larger_than_available_lists_all_others(folder, variables, tmp_path):
  entries = mel.list_images(folder)
  lists = _lists(entries, tmp_path / "ref.txt", variables, top_k=50)
  for key, candidates in lists.items():
    assert sorted(candidates) == sorted(e.name for e in entries if e.name != key)


def test_single_image_has_no_exemplar(folder, variables, tmp_path):
  with pytest.raises(InputError, match="red.png: no other image"):
    _lists([mel.Entry("red.png", folder / "red.png")], tmp_path / "ref.txt", variables)


def test_identical_files_tie_in_name_order(folder, variables, tmp_path):
  root = tmp_path / "images"
  root.mkdir()
  for name in ("10.png", "9.png", "query.png"):
    shutil.copy(
        folder / ("astronaut.png" if name != "query.png" else "astronaut_copy.jpg"), root / name
    )
  shutil.copy(folder / "coffee.png", root / "2.png")
  lists = _lists(mel.list_images(root), tmp_path / "ref.txt", variables, top_k=3)
  assert lists["query.png"][:2] == ["9.png", "10.png"]  # equal scores: natural name order
  # a duplicate is not the image itself
  assert lists["9.png"][0] == "10.png" and lists["10.png"][0] == "9.png"


def test_rank_chunked_matches_full_sort_and_excludes():
  rng = np.random.default_rng(0)
  candidates = rng.normal(size=(37, 8)).astype(np.float32)
  candidates[[5, 20, 30]] = candidates[11]  # exact duplicates: ties
  candidates /= np.linalg.norm(candidates, axis=1, keepdims=True)
  queries = np.concatenate([candidates[:10], candidates[[11]]])
  exclude = np.array(list(range(10)) + [11])
  for chunk_elements in (1, 40, 10**6):
    ranked = mel.rank(queries, candidates, 6, exclude, chunk_elements=chunk_elements)
    for row, query, own in zip(ranked, queries, exclude):
      scores = (query.astype(np.float64) @ candidates.T.astype(np.float64)).astype(np.float32)
      order = [j for j in np.lexsort((np.arange(37), -scores)) if j != own]
      np.testing.assert_array_equal(row, order[:6])
  # 11's duplicates first, in index order, 11 itself left out
  assert list(ranked[-1][:3]) == [
      5,
      20,
      30,
  ]


def test_separate_candidate_pool_excludes_the_same_file(folder, variables, tmp_path):
  pool = tmp_path / "pool.txt"
  pool.write_text(
      f"# the training split\n{folder / 'coffee.png'}\n\n{folder / 'rocket.png'}\n"
      f"{folder / 'rocket_copy.jpg'}\n"
  )
  queries = [mel.Entry(name, folder / name) for name in ("rocket.png", "coffee_copy.jpg")]
  lists = _lists(queries, tmp_path / "ref.txt", variables, candidate_entries=mel.list_images(pool))
  # not itself
  assert lists["rocket.png"] == [
      str(folder / "rocket_copy.jpg"),
      str(folder / "coffee.png"),
  ]
  assert (
      lists["coffee_copy.jpg"][0] == str(folder / "coffee.png")
      and len(lists["coffee_copy.jpg"]) == 3
  )


def test_list_entries_relative_to_list_with_windows_separators(folder, tmp_path):
  (tmp_path / "img" / "a").mkdir(parents=True)
  shutil.copy(folder / "red.png", tmp_path / "img" / "a" / "x.png")
  listing = tmp_path / "train.txt"
  listing.write_text("img\\a\\x.png\n")
  assert mel.list_images(listing) == [mel.Entry("img/a/x.png", tmp_path / "img/a/x.png")]


@pytest.mark.parametrize(
    "content, message",
    [
        ("a.png\na.png\n", "listed twice"),
        ("a,b.png\n", "cannot be written in a reference list"),
        ("# nothing\n", "names no files"),
    ],
)
def test_bad_lists(tmp_path, content, message):
  listing = tmp_path / "list.txt"
  listing.write_text(content)
  with pytest.raises(InputError, match=message):
    mel.list_images(listing)


def test_corrupt_image_is_named_or_skipped(folder, variables, tmp_path):
  root = tmp_path / "images"
  shutil.copytree(folder, root)
  (root / "broken.jpg").write_bytes((root / "chelsea_copy.jpg").read_bytes()[:200])
  with pytest.raises(InputError, match=r"broken\.jpg: not a readable image"):
    _lists(mel.list_images(root), tmp_path / "ref.txt", variables)
  assert not (tmp_path / "ref.txt").exists()
  lists = _lists(mel.list_images(root), tmp_path / "ref.txt", variables, skip_bad=True, top_k=20)
  assert "broken.jpg" not in lists and all("broken.jpg" not in c for c in lists.values())
  assert len(lists) == 15 and all(len(c) == 14 for c in lists.values())


def test_folder_with_label_maps_gives_its_photos(tmp_path):
  """``<name>.png`` beside ``<name>.jpg`` (the LSUN church layout): the .png files are label
  maps, and only the .jpg files are photos (as the official LSUN loader splits a folder); a note
  says so."""
  for name in ("b.jpg", "b.png", "a10.jpg", "a10.png", "a9.jpg", "c.jpeg"):
    Image.new("RGB", (8, 8)).save(tmp_path / name)
  notes = []
  assert [e.name for e in mel.list_images(tmp_path, notes)] == ["a9.jpg", "a10.jpg", "b.jpg"]
  assert notes == [
      f"{tmp_path} holds label maps beside its photos (<name>.png beside <name>.jpg, "
      "the LSUN church layout): listing its 3 .jpg photos, not its 3 other image "
      "files"
  ]
  (tmp_path / "b.jpg").rename(tmp_path / "d.jpg")  # no label map beside a photo: every image file
  (tmp_path / "a10.jpg").unlink()
  names = [e.name for e in mel.list_images(tmp_path)]
  assert names == ["a9.jpg", "a10.png", "b.png", "c.jpeg", "d.jpg"]


def test_official_lsun_folders_give_lists_prepare_reads(variables, tmp_path, capsys):
  """``--images`` = an official LSUN church folder (photos and label maps side by side): no label
  map in the lists, whose lines ``prepare`` accepts."""
  fake = fake_layouts.write_lsun_church(
      tmp_path / "lsun", n_train=4, n_val=3, image_shape=(SIDE, SIDE), texture=0.5
  )
  lists = {
      "training": tmp_path / "lists" / "ref.txt",
      "validation": tmp_path / "lists" / "ref_test.txt",
  }
  common = [
      f"--vgg_checkpoint={VGG_FILE}",
      f"--vgg_widths={','.join(map(str, WIDTHS))}",
      f"--image_size={FEATURE_SIZE}",
      "--top_k=3",
      "--batch_size=4",
      "--read_threads=2",
  ]
  for folder, output in lists.items():
    status = mel.run(
        ["make_exemplar_lists", f"--images={fake.root / folder}", f"--output={output}", *common]
    )
    err = capsys.readouterr().err
    assert status == 0, err
    assert f"note: {fake.root / folder} holds label maps beside its photos" in err
    assert ".png" not in output.read_text()
    keys = fake.train if folder == "training" else fake.validation
    photos = sorted(key.split("/")[1] for key in keys)
    parsed = mel.read_list(output)
    assert sorted(parsed) == photos and all(set(c) <= set(photos) for c in parsed.values())
  status = prepare.run(
      [
          "prepare",
          "--dataset=lsun_church",
          f"--manual_dir={fake.root}",
          f"--data_dir={tmp_path / 'tfds'}",
          f"--ref_list={lists['training']}",
          f"--ref_test_list={lists['validation']}",
      ]
  )
  out = capsys.readouterr().out
  assert status == 0, out
  assert "  train             4 records\n  validation        3 records\n" in out


def test_read_list_parses_the_official_files(tmp_path):
  path = tmp_path / "celebahq_ref_test.txt"
  path.write_text("7.jpg,177.jpg,221.jpg\n12.jpg,10386.jpg\n\n")
  assert mel.read_list(path) == {"7.jpg": ["177.jpg", "221.jpg"], "12.jpg": ["10386.jpg"]}
  path.write_text("7.jpg\n")
  with pytest.raises(InputError, match="line 1"):
    mel.read_list(path)


def test_cli_end_to_end(folder, variables, tmp_path, capsys):
  output = tmp_path / "out" / "ref.txt"
  status = mel.run(
      [
          "make_exemplar_lists",
          f"--images={folder}",
          f"--output={output}",
          f"--vgg_checkpoint={VGG_FILE}",
          f"--vgg_widths={','.join(map(str, WIDTHS))}",
          f"--image_size={FEATURE_SIZE}",
          "--top_k=20",
          "--batch_size=4",
          "--read_threads=2",
      ]
  )
  captured = capsys.readouterr()
  assert status == 0, captured.err
  assert f"wrote {output} (15 lines)" in captured.out
  assert "only 14 candidate(s)" in captured.err
  expected = tmp_path / "library.txt"
  assert _lists(mel.list_images(folder), expected, variables, top_k=20) == mel.read_list(output)
  assert output.read_text() == expected.read_text()


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--vgg_checkpoint=missing.pth", "missing.pth: VGG19 weight file not found"),
        ("--image_size=40", "--image_size=40: must be a positive multiple of 16"),
        ("--vgg_widths=8,16", "--vgg_widths=8,16: need 5 positive integers"),
        ("--top_k=0", "--top_k and --batch_size must be positive"),
    ],
)
def test_cli_errors(folder, tmp_path, capsys, flag, message):
  argv = [
      "make_exemplar_lists",
      f"--images={folder}",
      f"--output={tmp_path / 'ref.txt'}",
      f"--vgg_checkpoint={VGG_FILE}",
      f"--vgg_widths={','.join(map(str, WIDTHS))}",
      f"--image_size={FEATURE_SIZE}",
  ]
  status = mel.run(argv + [flag])
  err = capsys.readouterr().err
  assert status == 2 and err.startswith("error: ") and message in err and len(err.splitlines()) == 1
  assert not (tmp_path / "ref.txt").exists()


def test_cli_unwritable_output_and_missing_inputs(folder, tmp_path, capsys, monkeypatch):
  """One line, exit 2, before any feature is computed (a file where a folder should be: unwritable
  for root too)."""
  monkeypatch.setattr(mel, "extract_features", lambda *_, **__: pytest.fail("computed features"))
  (tmp_path / "a_file").write_text("not a folder")
  common = [
      f"--vgg_checkpoint={VGG_FILE}",
      f"--vgg_widths={','.join(map(str, WIDTHS))}",
      f"--image_size={FEATURE_SIZE}",
  ]
  a_file = tmp_path / "a_file"
  cases = {
      f"error: {a_file / 'ref.txt'}: cannot write --output there: {a_file} is a file, not a folder": [
          f"--images={folder}",
          f"--output={a_file / 'ref.txt'}",
      ],
      f"error: {tmp_path}: cannot write --output there: it is a folder, not a file": [
          f"--images={folder}",
          f"--output={tmp_path}",
      ],
      f"error: {tmp_path / 'nowhere'}: no such folder or file": [
          f"--images={tmp_path / 'nowhere'}",
          f"--output={tmp_path / 'ref.txt'}",
      ],
      f"error: {a_file / 'list.txt'}: cannot read the image list": [
          f"--images={folder}",
          f"--candidates={a_file / 'list.txt'}",
          f"--output={tmp_path / 'r.txt'}",
      ],
  }
  for message, args in cases.items():
    assert mel.run(["make_exemplar_lists", *args, *common]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]
