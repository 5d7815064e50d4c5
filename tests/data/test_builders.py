"""TFDS builders and sources of the benchmark data sets, on tiny fake data sets in the official
folder layouts: stored records, exemplar references, rendered records, batches through the pipeline,
bad data."""

import pathlib

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from configs import celebahq, deepfashion, lsun_church
from midms_jax.data import builders, conditions, fake_layouts, images, pipeline, sources
from midms_jax.errors import InputError

# ---------------------------------------------------------------------------------------------------------
# Fake data sets in the official layouts (midms_jax.data.fake_layouts), with the cases the tests
# need.

# 4: only an exemplar (in no list)
CELEBA_TRAIN, CELEBA_VAL, CELEBA_EXTRA = (
    (0, 1, 2, 3),
    (2000, 2001),
    4,
)
# 77: a line for an image in no list
CELEBA_REFS = {
    "0.jpg": ("1.jpg", "3.jpg"),
    "1.jpg": ("2.jpg",),
    "2.jpg": ("0.jpg", "1.jpg", "3.jpg"),
    "3.jpg": ("2001.jpg", "4.jpg"),
    "77.jpg": ("0.jpg",),
}
CELEBA_TEST_REFS = {"2000.jpg": ("2001.jpg", "0.jpg", "1.jpg"), "2001.jpg": ("2000.jpg",)}

FASHION_TRAIN = (
    "img/WOMEN/Dresses/id_00000001/01_1_front.jpg",
    "img/WOMEN/Dresses/id_00000001/01_2_side.jpg",
    "img/MEN/Denim/id_00000002/02_1_front.jpg",
)
FASHION_VAL = (
    "img/WOMEN/Tees_Tanks/id_00000003/03_1_front.jpg",
    "img/MEN/Denim/id_00000002/02_7_additional.jpg",
)
FASHION_SIZE = (64, 44)  # (height, width): portrait, like DeepFashion's 1101 x 750 photos

LSUN_TRAIN, LSUN_VAL = ("img2.jpg", "img10.jpg", "img1.jpg"), ("v1.jpg", "v2.jpg")
LSUN_SIDE = (
    40  # 8-pixel stripes of fake_layouts.LSUN_STRIPE_IDS; the photo's grey is a function of the id
)


def write_celebahq(root: pathlib.Path) -> fake_layouts.FakeDataSet:
  """Id 1 has no part masks."""
  return fake_layouts.write_celebahq(
      root,
      len(CELEBA_TRAIN),
      len(CELEBA_VAL),
      image_size=64,
      refs=CELEBA_REFS,
      test_refs=CELEBA_TEST_REFS,
      unmasked=(1,),
  )


def write_deepfashion(root: pathlib.Path) -> fake_layouts.FakeDataSet:
  """Lists with Windows separators; a validation image is a training exemplar."""
  return fake_layouts.write_deepfashion(
      root,
      image_shape=FASHION_SIZE,
      keys=(FASHION_TRAIN, FASHION_VAL),
      refs={
          FASHION_TRAIN[0]: (FASHION_TRAIN[2], FASHION_TRAIN[1]),
          FASHION_TRAIN[1]: (FASHION_TRAIN[0],),
          FASHION_TRAIN[2]: (FASHION_VAL[1],),
      },
      test_refs={FASHION_VAL[0]: (FASHION_TRAIN[0],), FASHION_VAL[1]: (FASHION_VAL[0],)},
  )


def write_lsun(root: pathlib.Path) -> fake_layouts.FakeDataSet:
  """Names whose natural order is not their text order."""
  return fake_layouts.write_lsun_church(
      root,
      image_shape=(LSUN_SIDE, LSUN_SIDE),
      names=(LSUN_TRAIN, LSUN_VAL),
      refs={
          "img1.jpg": ("img2.jpg", "img10.jpg"),
          "img2.jpg": ("img10.jpg",),
          "img10.jpg": ("img1.jpg", "img2.jpg"),
      },
      test_refs={"v1.jpg": ("v2.jpg", "v1.jpg"), "v2.jpg": ("v1.jpg",)},
  )


WRITERS = {"celebahq": write_celebahq, "deepfashion": write_deepfashion, "lsun_church": write_lsun}


def build(
    name: str, manual_dir: pathlib.Path, data_dir: pathlib.Path, **kwargs
) -> builders.BenchmarkBuilder:
  builder = builders.builder(name, data_dir, **kwargs)
  builder.download_and_prepare(
      download_dir=data_dir / "downloads",
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)),
  )
  return builder


@pytest.fixture(scope="module", name="prepared")
def _prepared(tmp_path_factory):
  """Each fake data set written and built once for the module: name -> (FakeDataSet, data_dir,
  builder)."""
  out = {}
  for name, write in WRITERS.items():
    fake = write(tmp_path_factory.mktemp(name))
    data_dir = tmp_path_factory.mktemp(f"{name}_tfds")
    out[name] = fake, data_dir, build(name, fake.root, data_dir)
  return out


def _stored(builder, split: str) -> list[dict]:
  decoders = {
      k: tfds.decode.SkipDecoding() for k in ("image", "label") if k in builder.info.features
  }
  return list(builder.as_data_source(split, decoders=decoders))


def _text(value) -> str:
  return value.decode() if isinstance(value, bytes) else value


def _refs(record: dict) -> tuple:
  return tuple(
      (_text(record[f"{r}_key"]), builders.SPLITS[record[f"{r}_split"]], int(record[f"{r}_index"]))
      for r in builders.EXEMPLARS
  )


def _cfg(config, data_dir, **overrides):
  data = config.data
  data.update(dict(data_dir=str(data_dir), **overrides))
  return data


# ---------------------------------------------------------------------------------------------------------
# Stored records.


def test_celebahq_records_keep_the_files_and_reference_their_exemplars(prepared):
  fake, _, builder = prepared["celebahq"]
  manual_dir = fake.root
  assert (fake.train, fake.validation, fake.exemplars) == tuple(
      tuple(f"{i}.jpg" for i in ids) for ids in (CELEBA_TRAIN, CELEBA_VAL, (CELEBA_EXTRA,))
  )
  assert {s: builder.info.splits[s].num_examples for s in builder.info.splits} == dict(
      train=4, validation=2, exemplars=1
  )
  train, val, extra = (_stored(builder, s) for s in builders.SPLITS)
  assert [_text(r["key"]) for r in train] == [f"{i}.jpg" for i in CELEBA_TRAIN]  # natural order
  for record in train + val + extra:
    key = _text(record["key"])
    # the original bytes
    assert record["image"] == (manual_dir / "CelebA-HQ-img" / key).read_bytes()
    masks = fake.condition_inputs[key]
    assert [conditions.CELEBAHQ_PART_NAMES[p] for p in record["mask_parts"]] == [
        p for p in conditions.CELEBAHQ_PART_NAMES if p in masks
    ]
    for part, data in zip(record["mask_parts"], record["masks"]):
      assert (
          data
          == builders.celebahq_mask_path(
              manual_dir, key, conditions.CELEBAHQ_PART_NAMES[part]
          ).read_bytes()
      )
  # Training list: first / last candidate; test list: first / second. Exemplars in other splits are
  # references.
  assert [_refs(r) for r in train] == [
      (("1.jpg", "train", 1), ("3.jpg", "train", 3)),
      (("2.jpg", "train", 2), ("2.jpg", "train", 2)),
      (("0.jpg", "train", 0), ("3.jpg", "train", 3)),
      (("2001.jpg", "validation", 1), ("4.jpg", "exemplars", 0)),
  ]
  assert [_refs(r) for r in val] == [
      (("2001.jpg", "validation", 1), ("0.jpg", "train", 0)),
      (("2000.jpg", "validation", 0), ("2000.jpg", "validation", 0)),
  ]
  assert _text(extra[0]["key"]) == "4.jpg" and _refs(extra[0]) == (("", "exemplars", -1),) * 2
  assert builder.skipped == [] and builder.info.metadata["skipped"] == []


def test_deepfashion_records_keep_the_pose_numbers(prepared):
  fake, _, builder = prepared["deepfashion"]
  train, val = _stored(builder, "train"), _stored(builder, "validation")
  assert [_text(r["key"]) for r in train] == list(FASHION_TRAIN)  # Windows paths -> keys with /
  for record in train + val:
    key = _text(record["key"])
    candidate, subset = fake.condition_inputs[key]
    assert record["image"] == (fake.root / key).read_bytes()
    np.testing.assert_array_equal(record["pose_candidate"], candidate[:, :2])
    assert record["pose_candidate"].dtype == np.float64
    np.testing.assert_array_equal(record["pose_subset"], subset[:18].astype(np.int32))
  refs = [_refs(r) for r in train]
  # Training: the last candidate; hard = a random other training record.
  assert [easy for easy, _ in refs] == [
      (FASHION_TRAIN[1], "train", 1),
      (FASHION_TRAIN[0], "train", 0),
      (FASHION_VAL[1], "validation", 1),
  ]
  for i, (_, (key, split, index)) in enumerate(refs):
    assert split == "train" and index != i and key == FASHION_TRAIN[index]
  assert [_refs(r) for r in val] == [
      ((FASHION_TRAIN[0], "train", 0),) * 2,
      ((FASHION_VAL[0], "validation", 0),) * 2,
  ]


def test_deepfashion_random_hard_exemplars_follow_the_seed(prepared, tmp_path):
  fake, _, builder = prepared["deepfashion"]
  again = build("deepfashion", fake.root, tmp_path / "same")
  assert [_refs(r) for r in _stored(again, "train")] == [
      _refs(r) for r in _stored(builder, "train")
  ]


def test_lsun_records_in_natural_order_with_exemplars_beside_them(prepared):
  fake, _, builder = prepared["lsun_church"]
  manual_dir = fake.root
  train, val = _stored(builder, "train"), _stored(builder, "validation")
  assert [_text(r["key"]) for r in train] == [
      "training/img1.jpg",
      "training/img2.jpg",
      "training/img10.jpg",
  ]
  assert [_text(r["key"]) for r in val] == ["validation/v1.jpg", "validation/v2.jpg"]
  for record in train + val:
    key = _text(record["key"])
    assert record["image"] == (manual_dir / key).read_bytes()
    assert record["label"] == (manual_dir / key.replace(".jpg", ".png")).read_bytes()
  assert [_refs(r) for r in train] == [
      (("training/img2.jpg", "train", 1), ("training/img10.jpg", "train", 2)),
      (("training/img10.jpg", "train", 2),) * 2,
      (("training/img1.jpg", "train", 0), ("training/img2.jpg", "train", 1)),
  ]
  assert [_refs(r) for r in val][0] == (
      ("validation/v2.jpg", "validation", 1),
      ("validation/v1.jpg", "validation", 0),
  )


# ---------------------------------------------------------------------------------------------------------
# Sources: the pipeline's records.


def _check_record(record: dict, side: int, channels: int) -> None:
  for image_key, label_key in (
      ("image", "label"),
      ("ref", "label_ref"),
      ("ref_hard", "label_ref_hard"),
  ):
    image, label = record[image_key], record[label_key]
    assert image.shape == (side, side, 3) and image.dtype == np.float32
    assert label.shape == (side, side, channels) and label.dtype == np.float32
    assert -1 <= image.min() and image.max() <= 1 and 0 <= label.min() and label.max() <= 1


def _photo_at(path: pathlib.Path, side: int) -> np.ndarray:
  return images.to_model_range(
      np.asarray(Image.open(path).convert("RGB").resize((side, side), Image.BICUBIC))
  )


def test_celebahq_source_renders_the_official_condition(prepared):
  fake, data_dir, _ = prepared["celebahq"]
  manual_dir = fake.root
  source = pipeline.make_source(_cfg(celebahq.get_config("tiny"), data_dir), "train")
  assert isinstance(source, sources.BenchmarkSource) and len(source) == 4
  anno = manual_dir / "CelebAMask-HQ-mask-anno"
  rendered = lambda image_id, side: conditions.celebahq_condition(
      Image.open(manual_dir / "CelebA-HQ-img" / f"{image_id}.jpg").convert("RGB"),
      conditions.celebahq_part_masks(anno, image_id),
      side,
  )
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
  fake, data_dir, _ = prepared["deepfashion"]
  source = pipeline.make_source(_cfg(deepfashion.get_config("tiny"), data_dir), "train")
  record = source[2]
  _check_record(record, 32, 20)
  candidate, subset = fake.condition_inputs[FASHION_TRAIN[2]]
  np.testing.assert_array_equal(
      record["label"], conditions.deepfashion_condition(candidate, subset, FASHION_SIZE, 32)
  )
  np.testing.assert_array_equal(record["image"], _photo_at(fake.root / FASHION_TRAIN[2], 32))
  # easy exemplar: the second validation image
  candidate, subset = fake.condition_inputs[FASHION_VAL[1]]
  np.testing.assert_array_equal(
      record["label_ref"], conditions.deepfashion_condition(candidate, subset, FASHION_SIZE, 32)
  )
  # skeleton and limb distances
  assert record["label"][..., :3].any() and (record["label"][..., 3:] < 1).any()


def test_lsun_source_one_hot_with_dont_care(prepared):
  fake, data_dir, _ = prepared["lsun_church"]
  source = pipeline.make_source(
      _cfg(lsun_church.get_config("tiny"), data_dir, load_size=40), "train"
  )
  record = source[0]  # img1, written third: stripes rotated by 2
  _check_record(record, 40, 151)
  np.testing.assert_array_equal(record["label"].sum(-1), 1.0)
  # img1's stripes: 149, 7, 0, 3, 255
  assert record["label"][0, 0, 149] == 1 and record["label"][39, 32, 150] == 1
  labels = fake.condition_inputs
  np.testing.assert_array_equal(
      np.argmax(record["label"], -1), channel_ids(labels["training/img1.jpg"])
  )
  np.testing.assert_array_equal(
      np.argmax(record["label_ref"], -1), channel_ids(labels["training/img2.jpg"])
  )


def channel_ids(ids: np.ndarray) -> np.ndarray:
  """Label ids -> one-hot channels: 255 (don't care) -> 150."""
  return np.where(ids == 255, 150, ids)


def _gray_of_ids(channels: np.ndarray) -> np.ndarray:
  """The fake photos' grey at each one-hot channel."""
  table = np.zeros(151)
  table[channel_ids(np.array(fake_layouts.LSUN_STRIPE_IDS))] = fake_layouts.LSUN_GRAYS
  return table[channels]


def _is_flipped(label_row: np.ndarray) -> bool:
  """Whether a row of one-hot labels reads the stripes right to left (the photos' stripes run
  cyclically through ``fake_layouts.LSUN_STRIPE_IDS`` left to right; a crop shows at least four of
  them)."""
  ids = np.argmax(label_row, -1)
  stripes = [int(i) for k, i in enumerate(ids) if k == 0 or i != ids[k - 1]]
  stripe_ids = fake_layouts.LSUN_STRIPE_IDS
  forward = list(channel_ids(np.array(stripe_ids))) * 2
  runs = lambda seq: any(seq == forward[k : k + len(seq)] for k in range(len(stripe_ids)))
  assert runs(stripes) != runs(stripes[::-1]), stripes
  return runs(stripes[::-1])


def test_batches_crop_and_flip_photo_and_condition_together(prepared):
  """LSUN photos whose colour is a function of the label id: after the pipeline's random crops and
  flips, every pixel of every image (ground truth and exemplar) still has its label's colour."""
  fake, data_dir, _ = prepared["lsun_church"]
  data_cfg = _cfg(
      lsun_church.get_config("tiny"),
      data_dir,
      load_size=40,
      eval_load_size=40,
      real_reference_probability=1.0,
      hard_reference_probability=0.5,
  )
  batches = iter(
      pipeline.make_dataset(
          data_cfg, "train", seed=3, batch_size=2, shard_index=0, shard_count=1, train=True
      )
  )
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
  evaluation = pipeline.make_dataset(
      data_cfg, "validation", seed=0, batch_size=2, shard_index=0, shard_count=1, train=False
  )
  batch = next(iter(evaluation))
  assert batch["label"].shape == (2, 32, 32, 151) and not any(
      _is_flipped(label[0]) for label in batch["label"]
  )
  centre = channel_ids(fake.condition_inputs["validation/v1.jpg"])[4:36, 4:36]
  np.testing.assert_array_equal(np.argmax(batch["label"][0], -1), centre)
  assert (
      np.abs(
          (batch["image"].mean(-1) + 1) / 2 * 255 - _gray_of_ids(np.argmax(batch["label"], -1))
      ).max()
      < 10
  )


@pytest.mark.parametrize("name, config", [("celebahq", celebahq), ("deepfashion", deepfashion)])
def test_batches_of_the_other_data_sets(prepared, name, config):
  _, data_dir, _ = prepared[name]
  data_cfg = _cfg(config.get_config("tiny"), data_dir)
  for split, train in (("train", True), ("validation", False)):
    batch = next(
        iter(
            pipeline.make_dataset(
                data_cfg, split, seed=0, batch_size=2, shard_index=0, shard_count=1, train=train
            )
        )
    )
    assert sorted(batch) == sorted(pipeline.BATCH_KEYS)
    for key in ("image", "ref"):
      assert batch[key].shape == (2, 32, 32, 3) and -1 <= batch[key].min() <= batch[key].max() <= 1
    for key in ("label", "label_ref"):
      assert (
          batch[key].shape == (2, 32, 32, data_cfg.label_nc)
          and 0 <= batch[key].min() <= batch[key].max() <= 1
      )


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
  assert (
      lsun_church.get_config().data.label_nc
      == 151
      == lsun_church.get_config().model.correspondence.label_channels
  )


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
  root = write_celebahq(tmp_path / "celeba").root
  bad = root / "CelebA-HQ-img" / "2.jpg"
  bad.write_bytes(bad.read_bytes()[:300])
  message = _build_error("celebahq", root, tmp_path / "a")
  assert message.startswith(f"{bad}: not a readable image (corrupt or truncated?)")
  builder = build("celebahq", root, tmp_path / "b", skip_bad=True)
  # 2.jpg is skipped, and 1.jpg, whose exemplars are 2.jpg; 1.jpg is still an exemplar of 0.jpg.
  assert [(s.split, s.key) for s in builder.skipped] == [("train", "1.jpg"), ("train", "2.jpg")]
  assert builder.skipped[0].reason.startswith(
      f"{root / 'celebahq_ref.txt'}:2: exemplar 2.jpg of 1.jpg: {bad}: "
  )
  assert builder.skipped[1].reason.startswith(f"{bad}: not a readable image")
  assert builder.info.metadata["skipped"][1] == dict(
      split="train", key="2.jpg", reason=builder.skipped[1].reason
  )
  train, extra = _stored(builder, "train"), _stored(builder, "exemplars")
  assert [_text(r["key"]) for r in train] == ["0.jpg", "3.jpg"]
  assert [_text(r["key"]) for r in extra] == ["1.jpg", "4.jpg"]
  assert _refs(train[0]) == (("1.jpg", "exemplars", 0), ("3.jpg", "train", 1))


def test_exemplar_list_problems_name_the_list(tmp_path):
  root = write_celebahq(tmp_path / "celeba").root
  (root / "celebahq_ref_test.txt").write_text("2000.jpg,9999.jpg\n2001.jpg,2000.jpg\n")
  message = _build_error("celebahq", root, tmp_path / "a")
  assert message == (
      f"{root / 'celebahq_ref_test.txt'}:1: exemplar 9999.jpg of 2000.jpg: "
      f"{root / 'CelebA-HQ-img' / '9999.jpg'}: no such file"
  )
  (root / "celebahq_ref_test.txt").write_text("2001.jpg,2000.jpg\n")
  message = _build_error("celebahq", root, tmp_path / "b")
  assert message == (
      f"{root / 'celebahq_ref_test.txt'}: no line for 2000.jpg (the exemplars of "
      f"{root / 'CelebA-HQ-img' / '2000.jpg'})"
  )
  builder = build("celebahq", root, tmp_path / "c", skip_bad=True)
  assert [(s.split, s.key) for s in builder.skipped] == [("validation", "2000.jpg")]
  # after 4.jpg
  assert [_refs(r) for r in _stored(builder, "validation")] == [(("2000.jpg", "exemplars", 1),) * 2]
  other = tmp_path / "lists" / "test.txt"
  other.parent.mkdir()
  other.write_text(
      "".join(",".join((key, *names)) + "\n" for key, names in CELEBA_TEST_REFS.items())
  )
  assert build("celebahq", root, tmp_path / "d", ref_test_list=other).skipped == []
  (root / "celebahq_ref.txt").unlink()
  message = _build_error("celebahq", root, tmp_path / "e")
  assert message == (
      f"{root / 'celebahq_ref.txt'}: no such file (the train exemplar list; pass its path with "
      "--ref_list)"
  )


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda c, s: c.write_text("1 2 x 4\n"), "{c}: not a table of numbers"),
        (lambda c, s: s.unlink(), "{s}: no such file"),
        (
            lambda c, s: s.write_text("0 1 2\n"),
            "{s}: expected one row of at least 18 keypoint indices",
        ),
        (lambda c, s: s.write_text(" ".join(["40"] * 18)), "{s}: refers to candidate row 40, but "),
    ],
)
def test_bad_pose_files(tmp_path, damage, expected):
  root = write_deepfashion(tmp_path / "fashion").root
  candidate, subset = builders.deepfashion_pose_files(root, FASHION_TRAIN[2])
  damage(candidate, subset)
  message = _build_error("deepfashion", root, tmp_path / "a")
  assert message.startswith(expected.format(c=candidate, s=subset)), message
  builder = build("deepfashion", root, tmp_path / "b", skip_bad=True)
  assert [(s.split, s.key, s.reason) for s in builder.skipped] == [
      ("train", FASHION_TRAIN[2], message)
  ]
  assert builder.info.splits["train"].num_examples == 2


def test_bad_lsun_label_maps(tmp_path):
  root = write_lsun(tmp_path / "lsun").root
  label = root / "training" / "img2.png"
  ids = np.full((LSUN_SIDE, LSUN_SIDE), 150)  # 150: the don't-care class, accepted (as 255)
  ids[5:7, 5:7] = 151  # no channel of the official 151-channel one-hot
  label.write_bytes(fake_layouts.png_bytes(ids))
  assert _build_error("lsun_church", root, tmp_path / "a") == (
      f"{label}: label ids must be 0..150 or 255 (read as 150, don't care), found 151"
  )
  label.unlink()
  assert _build_error("lsun_church", root, tmp_path / "b") == f"{label}: no such file"
  # Skipping img2 skips every training record (each uses img2 or one that does as an exemplar).
  assert _build_error("lsun_church", root, tmp_path / "c", skip_bad=True) == (
      f"{root}: no usable train record (see training/, the train exemplar list and the problems "
      "above)"
  )


def test_bad_list_lines(tmp_path):
  root = write_celebahq(tmp_path / "celeba").root
  (root / "train.txt").write_text("0\nface_1\n2\n3\n")
  assert (
      _build_error("celebahq", root, tmp_path / "a")
      == f"{root / 'train.txt'}:2: 'face_1' is not an image id"
  )
  fashion = write_deepfashion(tmp_path / "fashion").root
  (fashion / "val.txt").write_text(
      "img\\MEN\\Denim\\id_00000002\\02_7_additional.jpg\nphotos\\x.jpg\n"
  )
  assert _build_error("deepfashion", fashion, tmp_path / "b") == (
      f"{fashion / 'val.txt'}:2: photos\\x.jpg: not an image under img/ (img/.../<name>.jpg)"
  )
