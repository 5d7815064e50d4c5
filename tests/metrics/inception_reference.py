"""A plain-PyTorch reference of pytorch-fid's FID Inception-v3, written from torchvision's
``Inception3`` layout and pytorch-fid's patched blocks, for tests (neither torchvision nor
pytorch-fid is needed).

The network is a table (``NETWORK``): the stem convs and pools, then each mixed block as branches of
steps. A step is a conv ``Conv(name, in, out, kernel, stride, padding)``, a pool (``"avg"``: 3x3 /
1, padding 1, zeros not counted; ``"max"``: 3x3 / 2; ``"max1"``: 3x3 / 1, padding 1) or a ``Split``
of two convs applied to the same input and concatenated. Every conv is torchvision's ``BasicConv2d``
(bias-free conv, BatchNorm with eps 1e-3, ReLU), so its state-dict keys are
``<block>.<conv>.conv.weight`` and ``.bn.weight`` / ``.bn.bias`` / ``.bn.running_mean`` /
``.bn.running_var`` / ``.bn.num_batches_tracked``; the model also has pytorch-fid's unused 1008-way
``fc``. ``random_state_dict`` fills it with well-conditioned random numbers.
"""

from typing import NamedTuple

import numpy as np


class Conv(NamedTuple):
  name: str
  cin: int
  cout: int
  kernel: tuple[int, int]
  stride: int = 1
  padding: tuple[int, int] = (0, 0)


class Split(NamedTuple):
  first: Conv
  second: Conv


def conv(name: str, cin: int, cout: int, kernel, stride: int = 1, padding=0) -> Conv:
  pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)
  return Conv(name, cin, cout, pair(kernel), stride, pair(padding))


def block_a(cin: int, pool_features: int) -> list:
  return [
      [conv("branch1x1", cin, 64, 1)],
      [conv("branch5x5_1", cin, 48, 1), conv("branch5x5_2", 48, 64, 5, padding=2)],
      [
          conv("branch3x3dbl_1", cin, 64, 1),
          conv("branch3x3dbl_2", 64, 96, 3, padding=1),
          conv("branch3x3dbl_3", 96, 96, 3, padding=1),
      ],
      ["avg", conv("branch_pool", cin, pool_features, 1)],
  ]


def block_b(cin: int) -> list:
  return [
      [conv("branch3x3", cin, 384, 3, stride=2)],
      [
          conv("branch3x3dbl_1", cin, 64, 1),
          conv("branch3x3dbl_2", 64, 96, 3, padding=1),
          conv("branch3x3dbl_3", 96, 96, 3, stride=2),
      ],
      ["max"],
  ]


def block_c(cin: int, c7: int) -> list:
  row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
  return [
      [conv("branch1x1", cin, 192, 1)],
      [
          conv("branch7x7_1", cin, c7, 1),
          conv("branch7x7_2", c7, c7, **row),
          conv("branch7x7_3", c7, 192, **col),
      ],
      [
          conv("branch7x7dbl_1", cin, c7, 1),
          conv("branch7x7dbl_2", c7, c7, **col),
          conv("branch7x7dbl_3", c7, c7, **row),
          conv("branch7x7dbl_4", c7, c7, **col),
          conv("branch7x7dbl_5", c7, 192, **row),
      ],
      ["avg", conv("branch_pool", cin, 192, 1)],
  ]


def block_d(cin: int) -> list:
  return [
      [conv("branch3x3_1", cin, 192, 1), conv("branch3x3_2", 192, 320, 3, stride=2)],
      [
          conv("branch7x7x3_1", cin, 192, 1),
          conv("branch7x7x3_2", 192, 192, (1, 7), padding=(0, 3)),
          conv("branch7x7x3_3", 192, 192, (7, 1), padding=(3, 0)),
          conv("branch7x7x3_4", 192, 192, 3, stride=2),
      ],
      ["max"],
  ]


def block_e(cin: int, pool: str) -> list:
  row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
  return [
      [conv("branch1x1", cin, 320, 1)],
      [
          conv("branch3x3_1", cin, 384, 1),
          Split(conv("branch3x3_2a", 384, 384, **row), conv("branch3x3_2b", 384, 384, **col)),
      ],
      [
          conv("branch3x3dbl_1", cin, 448, 1),
          conv("branch3x3dbl_2", 448, 384, 3, padding=1),
          Split(conv("branch3x3dbl_3a", 384, 384, **row), conv("branch3x3dbl_3b", 384, 384, **col)),
      ],
      [pool, conv("branch_pool", cin, 192, 1)],
  ]


STEM = [
    conv("Conv2d_1a_3x3", 3, 32, 3, stride=2),
    conv("Conv2d_2a_3x3", 32, 32, 3),
    conv("Conv2d_2b_3x3", 32, 64, 3, padding=1),
    "max",
    conv("Conv2d_3b_1x1", 64, 80, 1),
    conv("Conv2d_4a_3x3", 80, 192, 3),
    "max",
]
BLOCKS = [
    ("Mixed_5b", block_a(192, 32)),
    ("Mixed_5c", block_a(256, 64)),
    ("Mixed_5d", block_a(288, 64)),
    ("Mixed_6a", block_b(288)),
    ("Mixed_6b", block_c(768, 128)),
    ("Mixed_6c", block_c(768, 160)),
    ("Mixed_6d", block_c(768, 160)),
    ("Mixed_6e", block_c(768, 192)),
    ("Mixed_7a", block_d(768)),
    ("Mixed_7b", block_e(1280, "avg")),
    ("Mixed_7c", block_e(2048, "max1")),
]


def convs(steps: list) -> list[Conv]:
  """Every conv of a block's branches (or of the stem)."""
  found = []
  for step in steps:
    if isinstance(step, list):
      found += convs(step)
    elif isinstance(step, Split):
      found += [step.first, step.second]
    elif isinstance(step, Conv):
      found.append(step)
  return found


def torch_modules(torch):
  """(BasicConv2d, Block, Network) classes of the reference, built on ``torch``."""
  nn, F = torch.nn, torch.nn.functional

  class BasicConv2d(nn.Module):

    def __init__(self, spec: Conv):
      super().__init__()
      self.conv = nn.Conv2d(
          spec.cin, spec.cout, spec.kernel, stride=spec.stride, padding=spec.padding, bias=False
      )
      self.bn = nn.BatchNorm2d(spec.cout, eps=1e-3)

    def forward(self, x):
      return F.relu(self.bn(self.conv(x)))

  def pool(kind: str, x):
    if kind == "avg":
      return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    if kind == "max1":
      return F.max_pool2d(x, 3, stride=1, padding=1)
    return F.max_pool2d(x, 3, stride=2)

  class Steps(nn.Module):
    """Runs a list of steps; as a block (``branches``), each branch on the input, outputs
    concatenated."""

    def __init__(self, steps: list, branches: bool):
      super().__init__()
      self.steps, self.branches = steps, branches
      for spec in convs(steps):
        self.add_module(spec.name, BasicConv2d(spec))

    def run(self, steps, x):
      for step in steps:
        if isinstance(step, str):
          x = pool(step, x)
        elif isinstance(step, Split):
          x = torch.cat([getattr(self, step.first.name)(x), getattr(self, step.second.name)(x)], 1)
        else:
          x = getattr(self, step.name)(x)
      return x

    def forward(self, x):
      if self.branches:
        return torch.cat([self.run(branch, x) for branch in self.steps], 1)
      return self.run(self.steps, x)

  class Network(nn.Module):
    """The whole FID Inception: resize to 299 (bilinear, no anti-aliasing), stem, blocks, global
    mean pool."""

    def __init__(self):
      super().__init__()
      for spec in convs(STEM):
        self.add_module(spec.name, BasicConv2d(spec))
      for name, steps in BLOCKS:
        self.add_module(name, Steps(steps, branches=True))
      self.fc = nn.Linear(2048, 1008)

    def forward(self, x):
      x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
      for step in STEM:
        x = pool(step, x) if isinstance(step, str) else getattr(self, step.name)(x)
      for name, _ in BLOCKS:
        x = getattr(self, name)(x)
      return x.mean(dim=(2, 3))

  return BasicConv2d, Steps, Network


def randomize(torch, module, seed: int = 0):
  """He-normal conv weights and random BatchNorm statistics (activations stay of order one); eval
  mode."""
  rng = np.random.default_rng(seed)
  for name, tensor in module.state_dict().items():
    shape = tuple(tensor.shape)
    if name.endswith("conv.weight"):
      value = rng.normal(0, np.sqrt(2 / np.prod(shape[1:])), shape)
    elif name.endswith("bn.weight") or name.endswith("running_var"):
      value = rng.uniform(0.5, 1.5, shape)
    elif name.endswith("num_batches_tracked"):
      continue
    else:
      value = rng.normal(0, 0.1, shape)
    tensor.copy_(torch.from_numpy(value.astype(np.float32)))
  return module.eval()
