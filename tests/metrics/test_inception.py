"""FID Inception-v3: import of a pytorch-fid-layout state dict (random weights: the real file cannot
be downloaded here), every block kind and the whole network against the plain-PyTorch reference of
``inception_reference``, and the 299 resize against ``F.interpolate``. (FID itself: ``test_fid.py``;
a 2048-d ``sqrtm`` takes a minute on two cores, so the tests compute FID on smaller features.)"""

import jax
import numpy as np
import pytest

from midms_jax.errors import CheckpointError
from midms_jax.interop import torch_names
from midms_jax.metrics import inception, suite
from tests.conftest import assert_close
from tests.metrics import inception_reference as ref

torch = pytest.importorskip("torch")

BLOCK_INPUTS = {  # block -> (Flax module, input side): small grids keep the check cheap
    "Mixed_5b": (inception.InceptionA(32), 9),
    "Mixed_6a": (inception.InceptionB(), 9),
    "Mixed_6b": (inception.InceptionC(128), 9),
    "Mixed_7a": (inception.InceptionD(), 9),
    "Mixed_7b": (inception.InceptionE(max_pool=False), 5),
    "Mixed_7c": (inception.InceptionE(max_pool=True), 5),
}


@pytest.fixture(scope="module")
def network():
  _, _, network = ref.torch_modules(torch)
  with torch.no_grad():
    return ref.randomize(torch, network())


@pytest.fixture(scope="module")
def weights_file(network, tmp_path_factory):
  path = tmp_path_factory.mktemp("inception") / inception.WEIGHTS_NAME
  torch.save(network.state_dict(), path)
  return path


def state_arrays(module) -> dict[str, np.ndarray]:
  return {k: v.numpy() for k, v in module.state_dict().items()}


def nchw(x: np.ndarray):
  return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def test_state_dict_is_consumed_completely_with_every_shape(network, weights_file):
  variables = inception.load_inception(weights_file)
  back = torch_names.state_dict_from_variables(variables)
  original = state_arrays(network)
  used = {k for k in original if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
  # 94 BasicConv2d: conv weight + 4 BatchNorm arrays each
  assert set(back) == used and len(used) == 5 * 94
  for key in used:
    assert back[key].shape == original[key].shape and np.array_equal(back[key], original[key]), key


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda s: s.pop("Mixed_6e.branch7x7dbl_4.bn.running_var"),
            r"1 key\(s\) missing.*Mixed_6e\.branch7x7dbl_4",
        ),
        (
            lambda s: s.update(
                {"Mixed_7c.branch3x3_2b.conv.weight": np.zeros((384, 384, 1, 3), np.float32)}
            ),
            r"Mixed_7c\.branch3x3_2b\.conv\.weight has shape \(384, 384, 1, 3\), model expects "
            r"\(384, 384, 3, 1\)",
        ),
        (
            lambda s: s.update({"Mixed_5b.branch_pool.bn.running_mean": np.zeros(64, np.float32)}),
            r"Mixed_5b\.branch_pool\.bn\.running_mean has shape \(64,\), model expects \(32,\)",
        ),
        (
            lambda s: s.update({"AuxLogits.fc.weight": np.zeros((1008, 768), np.float32)}),
            r"unexpected.*AuxLogits",
        ),
    ],
    ids=["missing", "transposed-kernel", "other-block-width", "unexpected"],
)
def test_bad_state_dicts_are_one_line_errors(network, tmp_path, change, message):
  state = state_arrays(network)
  change(state)
  path = tmp_path / "bad.pth"
  torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}, path)
  with pytest.raises(CheckpointError, match=message) as info:
    inception.load_inception(path)
  assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def test_absent_weights_name_the_file_to_get(tmp_path):
  with pytest.raises(
      CheckpointError,
      match=r"absent\.pth: no such file.*pt_inception-2015-12-05-6726825d\.pth.*"
      r"github\.com/mseitzer/pytorch-fid",
  ):
    inception.load_inception(tmp_path / "absent.pth")


@pytest.mark.parametrize("block", list(BLOCK_INPUTS))
def test_block_matches_pytorch(network, block):
  module, side = BLOCK_INPUTS[block]
  torch_block = getattr(network, block)
  cin = ref.convs(dict(ref.BLOCKS)[block])[0].cin
  x = np.random.default_rng(1).uniform(0, 1, (2, side, side, cin)).astype(np.float32)
  variables = inception.load_state_dict(
      state_arrays(torch_block), block, module=module, shape=(1, side, side, cin)
  )
  ours = jax.jit(module.apply)(variables, x)
  with torch.no_grad():
    expected = np.transpose(torch_block(nchw(x)).numpy(), (0, 2, 3, 1))
  assert_close(ours, expected, 1e-4 * max(1.0, float(np.abs(expected).max())), f"inception/{block}")


def test_resize_matches_pytorch_up_and_down():
  rng = np.random.default_rng(2)
  for side in (256, 333):
    x = rng.uniform(-1, 1, (1, side, side + 5, 3)).astype(np.float32)
    expected = torch.nn.functional.interpolate(
        nchw(x), size=(299, 299), mode="bilinear", align_corners=False
    )
    # PyTorch's float32 source positions can differ from ours by one ulp (3e-5 at 256): weights by
    # that much.
    assert_close(
        inception.resize_bilinear(x),
        np.transpose(expected.numpy(), (0, 2, 3, 1)),
        5e-5,
        f"resize {side}",
    )
  matrix = inception.bilinear_matrix(512, 299)
  # no anti-aliasing
  assert np.allclose(matrix.sum(axis=1), 1) and np.count_nonzero(matrix, axis=1).max() == 2


def test_network_matches_pytorch(network, weights_file):
  pixels = np.random.default_rng(3).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  features = suite.inception_features(inception.load_inception(weights_file), pixels)
  with torch.no_grad():
    expected = network(nchw(pixels.astype(np.float32) / 255 * 2 - 1)).numpy()
  assert (
      features.shape == (2, inception.FEATURES) and np.all(features >= 0) and np.std(features) > 0.1
  )
  assert_close(
      features, expected, 1e-4 * max(1.0, float(np.abs(expected).max())), "inception features"
  )
