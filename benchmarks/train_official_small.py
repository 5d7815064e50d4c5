"""The training job on the official small checkpoints and a fake CelebA-HQ data set in the official layout.

    python benchmarks/train_official_small.py --steps=40 --warmup=20

Writes a fake CelebA-HQ folder (CoCosNet layout, ``midms_jax.data.fake_layouts``), prepares it with the real
TFDS builder, and runs ``train.train_and_evaluate`` with ``configs/celebahq.py:tiny`` initialised from the
official small MIDMs checkpoint (``tests/fixtures/midms_small.pth``: U-Net, VQ first stage, correspondence
networks) and the small VGG19 (``tests/fixtures/vgg19_small.pth``): warm-up (matching only), then the
interleaved phase. Prints one JSON line: the mean loss of the first and last logged steps of each phase,
the checkpoints, and whether TensorBoard got images. CI runs the same loop on the synthetic config
(tests/test_train.py) and the same steps on these checkpoints (tests/test_train_step.py).
"""

import json
import pathlib
import tempfile

from absl import app, flags

from configs import celebahq
from midms_jax import platform_tuning, train
from midms_jax.data import fake_layouts, prepare

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"

_STEPS = flags.DEFINE_integer("steps", 40, "training steps in all")
_WARMUP = flags.DEFINE_integer("warmup", 20, "warm-up steps (matching only, U-Net frozen)")
_LR = flags.DEFINE_float(
    "lr", 1e-4, "learning rate of both groups (official: 3e-6, too small to see in 40 steps)"
)
_IMAGES = flags.DEFINE_integer("images", 64, "fake training photos")
_DIR = flags.DEFINE_string(
    "dir", None, "where the data and the workdir go (default: a temporary folder)"
)


def _phase_losses(metrics: list[dict], first: int, last: int, window: int = 5) -> dict[str, float]:
  losses = [m["loss_total"] for m in metrics if first <= m["step"] <= last]
  return dict(
      first=sum(losses[:window]) / len(losses[:window]),
      last=sum(losses[-window:]) / len(losses[-window:]),
  )


def main(argv):
  del argv
  root = pathlib.Path(_DIR.value or tempfile.mkdtemp(prefix="midms-official-small-"))
  fake_layouts.write_celebahq(
      root / "CelebAMask-HQ", n_train=_IMAGES.value, n_val=4, image_size=64, texture=0.5
  )
  prepare.prepare("celebahq", root / "CelebAMask-HQ", root / "tfds")
  config = celebahq.get_config("tiny")
  config.data.data_dir = str(root / "tfds")
  config.checkpoints.midms = str(FIXTURES / "midms_small.pth")
  config.loss.vgg_checkpoint = str(FIXTURES / "vgg19_small.pth")
  config.train.update(
      dict(
          batch_size=2,
          num_steps=_STEPS.value,
          warmup_iter=_WARMUP.value,
          lr=_LR.value,
          lr_diff_backbone=_LR.value,
          log_every=1,
          image_every=_STEPS.value // 2,
          checkpoint_every=_STEPS.value // 2,
      )
  )
  workdir = root / "workdir"
  train.train_and_evaluate(config, workdir)
  metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=import-outside-toplevel

  events = event_accumulator.EventAccumulator(
      str(next(workdir.glob("events.out.tfevents.*"))), size_guidance={"images": 0, "tensors": 0}
  )
  events.Reload()
  print(
      json.dumps(
          dict(
              warmup=_phase_losses(metrics, 1, _WARMUP.value),
              interleaved=_phase_losses(metrics, _WARMUP.value + 1, _STEPS.value),
              checkpoints=sorted(
                  int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()
              ),
              image_summaries=sum(
                  "condition" in tag for tag in events.Tags()["tensors"] + events.Tags()["images"]
              ),
              workdir=str(workdir),
          )
      )
  )


if __name__ == "__main__":
  platform_tuning.set_xla_flags()
  app.run(main)
