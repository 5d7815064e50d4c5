"""TFDS builders and sources of the benchmark data sets, on tiny fake data sets in the official folder layouts:
stored records, exemplar references, rendered records, batches through the pipeline, bad data."""

import io
import pathlib

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw

from configs import celebahq, deepfashion, lsun_church
from midms_jax.data import builders, conditions, images, pipeline, sources
from midms_jax.errors import InputError

# ---------------------------------------------------------------------------------------------------------
# Fake data sets, written the way the official files are laid out.

CELEBA_TRAIN, CELEBA_VAL, CELEBA_EXTRA = (0, 1, 2, 3), (2000, 2001), 4  # 4: only an exemplar (in no list)
CELEBA_REFS = "0.jpg,1.jpg,3.jpg\n1.jpg,2.jpg\n2.jpg,0.jpg,1.jpg,3.jpg\n3.jpg,2001.jpg,4.jpg\n77.jpg,0.jpg\n"
CELEBA_TEST_REFS = "2000.jpg,2001.jpg,0.jpg,1.jpg\n2001.jpg,2000.jpg\n"

FASHION_TRAIN = ("img/WOMEN/Dresses/id_00000001/01_1_front.jpg", "img/WOMEN/Dresses/id_00000001/01_2_side.jpg",
                 "img/MEN/Denim/id_00000002/02_1_front.jpg")
FASHION_VAL = ("img/WOMEN/Tees_Tanks/id_00000003/03_1_front.jpg", "img/MEN/Denim/id_00000002/02_7_additional.jpg")
FASHION_SIZE = (64, 44)  # (height, width): portrait, like DeepFashion's 1101 x 750 photos

LSUN_TRAIN, LSUN_VAL = ("img2.jpg", "img10.jpg", "img1.jpg"), ("v1.jpg", "v2.jpg")
LSUN_SIDE, STRIPE = 40, 8
LSUN_IDS = (0, 3, 255, 149, 7)                       # one label id per 8-pixel column stripe (order rotates per photo)
LSUN_GRAY = {0: 20, 3: 70, 255: 120, 149: 170, 7: 220}  # each id's photo colour: a condition derived from the photo


def _jpeg(pixels: np.ndarray, quality: int = 95) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(pixels.astype(np.uint8)).save(buffer, "JPEG", quality=quality)
  return buffer.getvalue()


def _png(pixels: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(pixels.astype(np.uint8)).save(buffer, "PNG")
  return buffer.getvalue()


def _write(path: pathlib.Path, data: bytes | str) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  (path.write_text if isinstance(data, str) else path.write_bytes)(data)
  return path


def _face(seed: int, side: int = 64) -> np.ndarray:
  """A photo with structure (Canny finds edges): background gradient, a face ellipse, eyes."""
  rng = np.random.default_rng(seed)
  image = Image.fromarray(np.tile(np.linspace(30, 200, side, dtype=np.uint8)[None, :, None], (side, 1, 3)))
  draw = ImageDraw.Draw(image)
  draw.ellipse((12, 8, 52, 60), fill=tuple(int(v) for v in rng.integers(120, 255, 3)))
  for x in (22, 36):
    draw.ellipse((x, 24, x + 6, 30), fill=(10, 10, 10))
  return np.asarray(image)


def _part_masks(image_id: int, side: int = 32) -> dict[str, np.ndarray]:
  """L-mode 0/255 masks at half the photo's size (CelebAMask-HQ: 512 for 1024 photos); id 1 has none."""
  if image_id == 1:
    return {}
  yy, xx = np.mgrid[:side, :side]
  skin = ((yy - 17) / 13) ** 2 + ((xx - 16) / 10) ** 2 < 1
  masks = dict(skin=skin, l_eye=(abs(yy - 13) < 2) & (abs(xx - 12) < 2), hair=yy < 5 + image_id % 3)
  if image_id % 2:
    masks["nose"] = (abs(yy - 18) < 3) & (abs(xx - 16) < 1)
  return {part: mask.astype(np.uint8) * 255 for part, mask in masks.items()}


def write_celebahq(root: pathlib.Path) -> pathlib.Path:
  for image_id in CELEBA_TRAIN + CELEBA_VAL + (CELEBA_EXTRA,):
    _write(root / "CelebA-HQ-img" / f"{image_id}.jpg", _jpeg(_face(image_id)))
    for part, mask in _part_masks(image_id).items():
      _write(builders.celebahq_mask_path(root, f"{image_id}.jpg", part), _png(mask))
  _write(root / "train.txt", "".join(f"{i}\n" for i in CELEBA_TRAIN))
  _write(root / "val.txt", "".join(f"{i}\n" for i in CELEBA_VAL))
  _write(root / "celebahq_ref.txt", CELEBA_REFS)
  _write(root / "celebahq_ref_test.txt", CELEBA_TEST_REFS)
  return root


def fashion_pose(k: int) -> tuple[np.ndarray, np.ndarray]:
  """OpenPose files' numbers: 18 candidates (x, y, score, id) inside the photo, and a subset with two missing."""
  rng = np.random.default_rng(k)
  candidate = np.column_stack([rng.integers(4, FASHION_SIZE[1] - 4, 18), rng.integers(4, FASHION_SIZE[0] - 4, 18),
                               rng.uniform(0.5, 1, 18).round(3), np.arange(18)]).astype(np.float64)
  subset = np.arange(18, dtype=np.float64)
  subset[[k % 18, (k + 5) % 18]] = -1
  return candidate, np.concatenate([subset, [25.3, 16]])  # OpenPose appends total score and keypoint count


def write_deepfashion(root: pathlib.Path) -> pathlib.Path:
  for k, key in enumerate(FASHION_TRAIN + FASHION_VAL):
    _write(root / key, _jpeg(_face(k + 10, side=64)[:, 10:10 + FASHION_SIZE[1]]))
    candidate, subset = fashion_pose(k)
    candidate_path, subset_path = builders.deepfashion_pose_files(root, key)
    _write(candidate_path, "".join(" ".join(f"{v:g}" for v in row) + "\n" for row in candidate))
    _write(subset_path, " ".join(f"{v:g}" for v in subset) + "\n")
  windows = lambda keys: "".join(key.replace("/", "\\") + "\r\n" for key in keys)
  _write(root / "train.txt", windows(FASHION_TRAIN))
  _write(root / "val.txt", windows(FASHION_VAL))
  t, v = [key.replace("/", "\\") for key in FASHION_TRAIN], [key.replace("/", "\\") for key in FASHION_VAL]
  _write(root / "deepfashion_ref.txt", f"{t[0]},{t[2]},{t[1]}\n{t[1]},{t[0]}\n{t[2]},{v[1]}\n")
  _write(root / "deepfashion_ref_test.txt", f"{v[0]},{t[0]}\n{v[1]},{v[0]}\n")
  return root


def lsun_stripes(k: int) -> np.ndarray:
  """The label ids of photo ``k``, (40, 40): 8-pixel column stripes of ``LSUN_IDS`` rotated by ``k``."""
  ids = np.roll(np.array(LSUN_IDS), k)
  return np.repeat(ids, STRIPE)[None, :].repeat(LSUN_SIDE, 0)


def write_lsun(root: pathlib.Path) -> pathlib.Path:
  for folder, names in (("training", LSUN_TRAIN), ("validation", LSUN_VAL)):
    for name in names:
      k = int(name[3:-4] if name.startswith("img") else name[1:-4])
      ids = lsun_stripes(k)
      gray = np.vectorize(LSUN_GRAY.get)(ids)
      _write(root / folder / name, _jpeg(np.repeat(gray[..., None], 3, -1)))
      _write(root / folder / name.replace(".jpg", ".png"), _png(ids))
  _write(root / "lsun_church_ref.txt", "img1.jpg,img2.jpg,img10.jpg\nimg2.jpg,img10.jpg\nimg10.jpg,img1.jpg,img2.jpg\n")
  _write(root / "lsun_church_ref_test.txt", "v1.jpg,v2.jpg,v1.jpg\nv2.jpg,v1.jpg\n")
  return root


WRITERS = {"celebahq": write_celebahq, "deepfashion": write_deepfashion, "lsun_church": write_lsun}


def build(name: str, manual_dir: pathlib.Path, data_dir: pathlib.Path, **kwargs) -> builders.BenchmarkBuilder:
  builder = builders.builder(name, data_dir, **kwargs)
  builder.download_and_prepare(download_dir=data_dir / "downloads",
                               download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  return builder


@pytest.fixture(scope="module", name="prepared")
def _prepared(tmp_path_factory):
  """Each fake data set written and built once for the module: name -> (manual_dir, data_dir, builder)."""
  out = {}
  for name, write in WRITERS.items():
    manual_dir = write(tmp_path_factory.mktemp(name))
    data_dir = tmp_path_factory.mktemp(f"{name}_tfds")
    out[name] = manual_dir, data_dir, build(name, manual_dir, data_dir)
  return out


def _stored(builder, split: str) -> list[dict]:
  decoders = {k: tfds.decode.SkipDecoding() for k in ("image", "label") if k in builder.info.features}
  return list(builder.as_data_source(split, decoders=decoders))


def _text(value) -> str:
  return value.decode() if isinstance(value, bytes) else value


def _refs(record: dict) -> tuple:
  return tuple((_text(record[f"{r}_key"]), builders.SPLITS[record[f"{r}_split"]], int(record[f"{r}_index"]))
               for r in builders.EXEMPLARS)


def _cfg(config, data_dir, **overrides):
  data = config.data
  data.update(dict(data_dir=str(data_dir), **overrides))
  return data


# ---------------------------------------------------------------------------------------------------------
# Stored records.

def test_celebahq_records_keep_the_files_and_reference_their_exemplars(prepared):
  manual_dir, _, builder = prepared["celebahq"]
  assert {s: builder.info.splits[s].num_examples for s in builder.info.splits} == dict(
      train=4, validation=2, exemplars=1)
  train, val, extra = (_stored(builder, s) for s in builders.SPLITS)
  assert [_text(r["key"]) for r in train] == [f"{i}.jpg" for i in CELEBA_TRAIN]  # list order
  for record in train + val + extra:
    key = _text(record["key"])
    assert record["image"] == (manual_dir / "CelebA-HQ-img" / key).read_bytes()  # the original bytes
    masks = _part_masks(int(key[:-4]))
    assert [conditions.CELEBAHQ_PART_NAMES[p] for p in record["mask_parts"]] == [
        p for p in conditions.CELEBAHQ_PART_NAMES if p in masks]
    for part, data in zip(record["mask_parts"], record["masks"]):
      assert data == builders.celebahq_mask_path(manual_dir, key, conditions.CELEBAHQ_PART_NAMES[part]).read_bytes()
  # Training list: first / last candidate; test list: first / second. Exemplars in other splits are references.
  assert [_refs(r) for r in train] == [
      (("1.jpg", "train", 1), ("3.jpg", "train", 3)), (("2.jpg", "train", 2), ("2.jpg", "train", 2)),
      (("0.jpg", "train", 0), ("3.jpg", "train", 3)), (("2001.jpg", "validation", 1), ("4.jpg", "exemplars", 0))]
  assert [_refs(r) for r in val] == [(("2001.jpg", "validation", 1), ("0.jpg", "train", 0)),
                                     (("2000.jpg", "validation", 0), ("2000.jpg", "validation", 0))]
  assert _text(extra[0]["key"]) == "4.jpg" and _refs(extra[0]) == (("", "exemplars", -1),) * 2
  assert builder.skipped == [] and builder.info.metadata["skipped"] == []


def test_deepfashion_records_keep_the_pose_numbers(prepared):
  manual_dir, _, builder = prepared["deepfashion"]
  train, val = _stored(builder, "train"), _stored(builder, "validation")
  assert [_text(r["key"]) for r in train] == list(FASHION_TRAIN)  # Windows paths -> keys with /
  for k, record in enumerate(train + val):
    candidate, subset = fashion_pose(k)
    assert record["image"] == (manual_dir / _text(record["key"])).read_bytes()
    np.testing.assert_array_equal(record["pose_candidate"], candidate[:, :2])
    assert record["pose_candidate"].dtype == np.float64
    np.testing.assert_array_equal(record["pose_subset"], subset[:18].astype(np.int32))
  refs = [_refs(r) for r in train]
  # Training: the last candidate; hard = a random other training record.
  assert [easy for easy, _ in refs] == [(FASHION_TRAIN[1], "train", 1), (FASHION_TRAIN[0], "train", 0),
                                        (FASHION_VAL[1], "validation", 1)]
  for i, (_, (key, split, index)) in enumerate(refs):
    assert split == "train" and index != i and key == FASHION_TRAIN[index]
  assert [_refs(r) for r in val] == [((FASHION_TRAIN[0], "train", 0),) * 2, ((FASHION_VAL[0], "validation", 0),) * 2]


def test_deepfashion_random_hard_exemplars_follow_the_seed(prepared, tmp_path):
  manual_dir, _, builder = prepared["deepfashion"]
  again = build("deepfashion", manual_dir, tmp_path / "same")
  assert [_refs(r) for r in _stored(again, "train")] == [_refs(r) for r in _stored(builder, "train")]


def test_lsun_records_in_natural_order_with_exemplars_beside_them(prepared):
  manual_dir, _, builder = prepared["lsun_church"]
  train, val = _stored(builder, "train"), _stored(builder, "validation")
  assert [_text(r["key"]) for r in train] == ["training/img1.jpg", "training/img2.jpg", "training/img10.jpg"]
  assert [_text(r["key"]) for r in val] == ["validation/v1.jpg", "validation/v2.jpg"]
  for record in train + val:
    key = _text(record["key"])
    assert record["image"] == (manual_dir / key).read_bytes()
    assert record["label"] == (manual_dir / key.replace(".jpg", ".png")).read_bytes()
  assert [_refs(r) for r in train] == [
      (("training/img2.jpg", "train", 1), ("training/img10.jpg", "train", 2)),
      (("training/img10.jpg", "train", 2),) * 2,
      (("training/img1.jpg", "train", 0), ("training/img2.jpg", "train", 1))]
  assert [_refs(r) for r in val][0] == (("validation/v2.jpg", "validation", 1), ("validation/v1.jpg", "validation", 0))


# ---------------------------------------------------------------------------------------------------------
# Sources: the pipeline's records.

def _check_record(record: dict, side: int, channels: int) -> None:
  for image_key, label_key in (("image", "label"), ("ref", "label_ref"), ("ref_hard", "label_ref_hard")):
    image, label = record[image_key], record[label_key]
    assert image.shape == (side, side, 3) and image.dtype == np.float32
    assert label.shape == (side, side, channels) and label.dtype == np.float32
    assert -1 <= image.min() and image.max() <= 1 and 0 <= label.min() and label.max() <= 1


def _photo_at(path: pathlib.Path, side: int) -> np.ndarray:
  return images.to_model_range(np.asarray(Image.open(path).convert("RGB").resize((side, side), Image.BICUBIC)))


def test_celebahq_source_renders_the_official_condition(prepared):
  manual_dir, data_dir, _ = prepared["celebahq"]
  source = pipeline.make_source(_cfg(celebahq.get_config("tiny"), data_dir), "train")
  assert isinstance(source, sources.BenchmarkSource) and len(source) == 4
  anno = manual_dir / "CelebAMask-HQ-mask-anno"
  rendered = lambda image_id, side: conditions.celebahq_condition(
      Image.open(manual_dir / "CelebA-HQ-img" / f"{image_id}.jpg").convert("RGB"),
      conditions.celebahq_part_masks(anno, image_id), side)
  record = source[3]
  _check_record(record, 36, 15)
  np.testing.assert_array_equal(record["image"], _photo_at(manual_dir / "CelebA-HQ-img/3.jpg", 36))
  np.testing.assert_array_equal(record["label"], rendered(3, 36))
  np.testing.assert_array_equal(record["ref"], _photo_at(manual_dir / "CelebA-HQ-img/2001.jpg", 36))
  np.testing.assert_array_equal(record["label_ref"], rendered(2001, 36))
  np.testing.assert_array_equal(record["label_ref_hard"], rendered(4, 36))
  assert record["label"][..., 14].any() and record["label"][..., 0].any()  # part boundaries; edges
  no_masks = source[1]["label"]  # id 1 has no part masks: distance maps saturate, no boundaries
  np.testing.assert_array_equal(no_masks[..., 1:14], 1.0)
  np.testing.assert_array_equal(no_masks[..., 14], 0.0)
  validation = pipeline.make_source(_cfg(celebahq.get_config("tiny"), data_dir), "validation")
  _check_record(validation[0], 32, 15)  # eval_load_size


def test_deepfashion_source_draws_the_pose_at_the_photo_size(prepared):
  manual_dir, data_dir, _ = prepared["deepfashion"]
  source = pipeline.make_source(_cfg(deepfashion.get_config("tiny"), data_dir), "train")
  record = source[2]
  _check_record(record, 32, 20)
  candidate, subset = fashion_pose(2)
  np.testing.assert_array_equal(record["label"], conditions.deepfashion_condition(candidate, subset, FASHION_SIZE, 32))
  np.testing.assert_array_equal(record["image"], _photo_at(manual_dir / FASHION_TRAIN[2], 32))
  candidate, subset = fashion_pose(len(FASHION_TRAIN) + 1)  # easy exemplar: the second validation image
  np.testing.assert_array_equal(record["label_ref"],
                                conditions.deepfashion_condition(candidate, subset, FASHION_SIZE, 32))
  assert record["label"][..., :3].any() and (record["label"][..., 3:] < 1).any()  # skeleton and limb distances


def test_lsun_source_one_hot_with_dont_care(prepared):
  _, data_dir, _ = prepared["lsun_church"]
  source = pipeline.make_source(_cfg(lsun_church.get_config("tiny"), data_dir, load_size=40), "train")
  record = source[0]  # img1: stripes rotated by 1
  _check_record(record, 40, 151)
  np.testing.assert_array_equal(record["label"].sum(-1), 1.0)
  assert record["label"][0, 0, 7] == 1 and record["label"][39, 24, 150] == 1  # img1's stripes: 7, 0, 3, 255, 149
  np.testing.assert_array_equal(np.argmax(record["label"], -1), channel_ids(lsun_stripes(1)))
  np.testing.assert_array_equal(np.argmax(record["label_ref"], -1), channel_ids(lsun_stripes(2)))  # img2


def channel_ids(ids: np.ndarray) -> np.ndarray:
  """Label ids -> one-hot channels: 255 (don't care) -> 150."""
  return np.where(ids == 255, 150, ids)


def _gray_of_ids(ids: np.ndarray) -> np.ndarray:
  table = np.zeros(151)
  for label_id, gray in LSUN_GRAY.items():
    table[150 if label_id == 255 else label_id] = gray
  return table[ids]


def _is_flipped(label_row: np.ndarray) -> bool:
  """Whether a row of one-hot labels reads the stripes right to left (the photos' stripes run cyclically
  through ``LSUN_IDS`` left to right; a crop shows at least four of them)."""
  ids = np.argmax(label_row, -1)
  stripes = [int(i) for k, i in enumerate(ids) if k == 0 or i != ids[k - 1]]
  forward = list(channel_ids(np.array(LSUN_IDS))) * 2
  runs = lambda seq: any(seq == forward[k:k + len(seq)] for k in range(len(LSUN_IDS)))
  assert runs(stripes) != runs(stripes[::-1]), stripes
  return runs(stripes[::-1])


def test_batches_crop_and_flip_photo_and_condition_together(prepared):
  """LSUN photos whose colour is a function of the label id: after the pipeline's random crops and flips,
  every pixel of every image (ground truth and exemplar) still has its label's colour."""
  _, data_dir, _ = prepared["lsun_church"]
  data_cfg = _cfg(lsun_church.get_config("tiny"), data_dir, load_size=40, eval_load_size=40,
                  real_reference_probability=1.0, hard_reference_probability=0.5)
  batches = iter(pipeline.make_dataset(data_cfg, "train", seed=3, batch_size=2, shard_index=0, shard_count=1,
                                       train=True))
  flips, first_columns = set(), set()
  for _ in range(6):
    batch = next(batches)
    assert batch["image"].shape == (2, 32, 32, 3) and batch["label"].shape == (2, 32, 32, 151)
    for image_key, label_key in (("image", "label"), ("ref", "label_ref")):
      gray = (batch[image_key].mean(-1) + 1) / 2 * 255
      assert np.abs(gray - _gray_of_ids(np.argmax(batch[label_key], -1))).max() < 10
      flips.update(_is_flipped(label[0]) for label in batch[label_key])
      first_columns.update(np.argmax(batch[label_key][:, 0, :4], -1).reshape(-1).tolist())
  assert flips == {False, True} and len(first_columns) > 2  # both flips and several crops were seen
  evaluation = pipeline.make_dataset(data_cfg, "validation", seed=0, batch_size=2, shard_index=0, shard_count=1,
                                     train=False)
  batch = next(iter(evaluation))
  assert batch["label"].shape == (2, 32, 32, 151) and not any(_is_flipped(label[0]) for label in batch["label"])
  np.testing.assert_array_equal(np.argmax(batch["label"][0], -1), channel_ids(lsun_stripes(1))[4:36, 4:36])  # centre
  assert np.abs((batch["image"].mean(-1) + 1) / 2 * 255 - _gray_of_ids(np.argmax(batch["label"], -1))).max() < 10


@pytest.mark.parametrize("name, config", [("celebahq", celebahq), ("deepfashion", deepfashion)])
def test_batches_of_the_other_data_sets(prepared, name, config):
  _, data_dir, _ = prepared[name]
  data_cfg = _cfg(config.get_config("tiny"), data_dir)
  for split, train in (("train", True), ("validation", False)):
    batch = next(iter(pipeline.make_dataset(data_cfg, split, seed=0, batch_size=2, shard_index=0, shard_count=1,
                                            train=train)))
    assert sorted(batch) == sorted(pipeline.BATCH_KEYS)
    for key in ("image", "ref"):
      assert batch[key].shape == (2, 32, 32, 3) and -1 <= batch[key].min() <= batch[key].max() <= 1
    for key in ("label", "label_ref"):
      assert batch[key].shape == (2, 32, 32, data_cfg.label_nc) and 0 <= batch[key].min() <= batch[key].max() <= 1


def test_sources_refuse_what_they_cannot_serve(prepared, tmp_path):
  with pytest.raises(InputError) as info:
    pipeline.make_source(_cfg(celebahq.get_config("tiny"), tmp_path / "empty"), "train")
  message = str(info.value)
  assert "\n" not in message and "no 'train' split of celebahq" in message
  assert "python -m midms_jax.data.prepare --dataset=celebahq --manual_dir=" in message
  assert f"--data_dir={tmp_path / 'empty'}" in message
  _, data_dir, _ = prepared["lsun_church"]
  with pytest.raises(InputError, match="no 'test' split of lsun_church"):
    pipeline.make_source(_cfg(lsun_church.get_config("tiny"), data_dir), "test")
  with pytest.raises(ValueError, match="label_nc=150, but lsun_church conditions have 151"):
    pipeline.make_source(_cfg(lsun_church.get_config("tiny"), data_dir, label_nc=150), "train")
  assert lsun_church.get_config().data.label_nc == 151 == lsun_church.get_config().model.correspondence.label_channels


# ---------------------------------------------------------------------------------------------------------
# Bad data.

def _build_error(name: str, manual_dir: pathlib.Path, data_dir: pathlib.Path, **kwargs) -> str:
  with pytest.raises(InputError) as info:
    build(name, manual_dir, data_dir, **kwargs)
  message = str(info.value)
  assert "\n" not in message
  assert not list(data_dir.glob(f"{name}/*/*.array_record*"))  # nothing written
  return message


def test_corrupt_image_stops_or_is_skipped_with_its_users(tmp_path):
  root = write_celebahq(tmp_path / "celeba")
  bad = root / "CelebA-HQ-img" / "2.jpg"
  bad.write_bytes(bad.read_bytes()[:300])
  message = _build_error("celebahq", root, tmp_path / "a")
  assert message.startswith(f"{bad}: not a readable image (corrupt or truncated?)")
  builder = build("celebahq", root, tmp_path / "b", skip_bad=True)
  # 2.jpg is skipped, and 1.jpg, whose exemplars are 2.jpg; 1.jpg is still an exemplar of 0.jpg.
  assert [(s.split, s.key) for s in builder.skipped] == [("train", "1.jpg"), ("train", "2.jpg")]
  assert builder.skipped[0].reason.startswith(f"{root / 'celebahq_ref.txt'}:2: exemplar 2.jpg of 1.jpg: {bad}: ")
  assert builder.skipped[1].reason.startswith(f"{bad}: not a readable image")
  assert builder.info.metadata["skipped"][1] == dict(split="train", key="2.jpg", reason=builder.skipped[1].reason)
  train, extra = _stored(builder, "train"), _stored(builder, "exemplars")
  assert [_text(r["key"]) for r in train] == ["0.jpg", "3.jpg"]
  assert [_text(r["key"]) for r in extra] == ["1.jpg", "4.jpg"]
  assert _refs(train[0]) == (("1.jpg", "exemplars", 0), ("3.jpg", "train", 1))


def test_exemplar_list_problems_name_the_list(tmp_path):
  root = write_celebahq(tmp_path / "celeba")
  (root / "celebahq_ref_test.txt").write_text("2000.jpg,9999.jpg\n2001.jpg,2000.jpg\n")
  message = _build_error("celebahq", root, tmp_path / "a")
  assert message == (f"{root / 'celebahq_ref_test.txt'}:1: exemplar 9999.jpg of 2000.jpg: "
                     f"{root / 'CelebA-HQ-img' / '9999.jpg'}: no such file")
  (root / "celebahq_ref_test.txt").write_text("2001.jpg,2000.jpg\n")
  message = _build_error("celebahq", root, tmp_path / "b")
  assert message == (f"{root / 'celebahq_ref_test.txt'}: no line for 2000.jpg (the exemplars of "
                     f"{root / 'CelebA-HQ-img' / '2000.jpg'})")
  builder = build("celebahq", root, tmp_path / "c", skip_bad=True)
  assert [(s.split, s.key) for s in builder.skipped] == [("validation", "2000.jpg")]
  assert [_refs(r) for r in _stored(builder, "validation")] == [(("2000.jpg", "exemplars", 1),) * 2]  # after 4.jpg
  other = tmp_path / "lists" / "test.txt"
  _write(other, CELEBA_TEST_REFS)
  assert build("celebahq", root, tmp_path / "d", ref_test_list=other).skipped == []
  (root / "celebahq_ref.txt").unlink()
  message = _build_error("celebahq", root, tmp_path / "e")
  assert message == (f"{root / 'celebahq_ref.txt'}: no such file (the train exemplar list; pass its path with "
                     "--ref_list)")


@pytest.mark.parametrize("damage, expected", [
    (lambda c, s: c.write_text("1 2 x 4\n"), "{c}: not a table of numbers"),
    (lambda c, s: s.unlink(), "{s}: no such file"),
    (lambda c, s: s.write_text("0 1 2\n"), "{s}: expected one row of at least 18 keypoint indices"),
    (lambda c, s: s.write_text(" ".join(["40"] * 18)), "{s}: refers to candidate row 40, but "),
])
def test_bad_pose_files(tmp_path, damage, expected):
  root = write_deepfashion(tmp_path / "fashion")
  candidate, subset = builders.deepfashion_pose_files(root, FASHION_TRAIN[2])
  damage(candidate, subset)
  message = _build_error("deepfashion", root, tmp_path / "a")
  assert message.startswith(expected.format(c=candidate, s=subset)), message
  builder = build("deepfashion", root, tmp_path / "b", skip_bad=True)
  assert [(s.split, s.key, s.reason) for s in builder.skipped] == [("train", FASHION_TRAIN[2], message)]
  assert builder.info.splits["train"].num_examples == 2


def test_bad_lsun_label_maps(tmp_path):
  root = write_lsun(tmp_path / "lsun")
  label = root / "training" / "img2.png"
  label.write_bytes(_png(np.full((40, 40), 200)))
  assert _build_error("lsun_church", root, tmp_path / "a").startswith(
      f"{label}: label ids must be 0..149 or 255 (don't care), found 200")
  label.unlink()
  assert _build_error("lsun_church", root, tmp_path / "b") == f"{label}: no such file"
  # Skipping img2 skips every training record (each uses img2 or one that does as an exemplar).
  assert _build_error("lsun_church", root, tmp_path / "c", skip_bad=True) == (
      f"{root}: no usable train record (see train.txt, the train exemplar list and the problems above)")


def test_bad_list_lines(tmp_path):
  root = write_celebahq(tmp_path / "celeba")
  (root / "train.txt").write_text("0\nface_1\n2\n3\n")
  assert _build_error("celebahq", root, tmp_path / "a") == f"{root / 'train.txt'}:2: 'face_1' is not an image id"
  fashion = write_deepfashion(tmp_path / "fashion")
  (fashion / "val.txt").write_text("img\\MEN\\Denim\\id_00000002\\02_7_additional.jpg\nphotos\\x.jpg\n")
  assert _build_error("deepfashion", fashion, tmp_path / "b") == (
      f"{fashion / 'val.txt'}:2: photos\\x.jpg: not an image under img/ (img/.../<name>.jpg)")
