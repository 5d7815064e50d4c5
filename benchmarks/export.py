"""Export benchmark: wall time and peak host memory of ``python -m midms_jax.export`` on a full-size workdir.

    python benchmarks/export.py --config=configs/celebahq.py            # 354M-parameter model, ~4 GB checkpoint
    python benchmarks/export.py --config=configs/synthetic.py           # seconds

Writes a training workdir with random weights and a real AdamW state (what ``train.py`` saves), then
runs the export CLI in a subprocess and reads its peak resident memory. The figure to compare is
``peak_rss - import_rss`` (``import_rss``: the same export of the tiny synthetic model, i.e. the
interpreter and its libraries) against the model's bytes and the checkpoint's (model + optimiser) bytes. Prints one JSON line.
"""

import json
import pathlib
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags
from ml_collections import config_flags

from configs import synthetic
from midms_jax import optim, platform_tuning, train_step, workdir as workdir_lib
from midms_jax.models import build

_CONFIG = config_flags.DEFINE_config_file("config", "configs/celebahq.py", "model config")
_LAYOUT = flags.DEFINE_enum("official_layout", "full", ["full", "minimal"], "passed to the export")
_DIR = flags.DEFINE_string(
    "dir", None, "where the workdir and the export go (default: a temporary folder)"
)


def _bytes(tree) -> int:
  return sum(int(np.size(x)) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))


def write_workdir(config, workdir: pathlib.Path) -> tuple[int, int]:
  """A workdir as training leaves it (random weights); returns (model bytes, checkpoint state
  bytes)."""
  workdir.mkdir(parents=True)
  workdir_lib.write_config(workdir, config)
  variables = build.init_variables(config.model, jax.random.PRNGKey(0))
  workdir_lib.save_first_stage(workdir, variables["first_stage"])
  state = train_step.create_train_state(
      variables, optim.make_optimizer(config.train, freeze_unet=True)
  )
  model_bytes = _bytes(variables)
  state_bytes = _bytes(state)
  del variables
  with ocp.CheckpointManager(
      workdir / workdir_lib.CHECKPOINTS_DIR, item_names=("state", "data")
  ) as manager:
    manager.save(
        1, args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave({}))
    )
    manager.wait_until_finished()
  return model_bytes, state_bytes


# Runs a module as ``python -m`` would and prints its peak resident memory (VmHWM: this process
# image only; ``ru_maxrss`` would include the benchmark's own memory, inherited through fork).
_MEASURED = """
import runpy, sys
sys.argv = sys.argv[1:]
try:
  runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
except SystemExit as e:
  if e.code:
    raise
finally:
  hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
  print(f"peak_rss_kib={hwm}", file=sys.stderr)
"""


def peak_rss_of(module: str, *args: str) -> tuple[float, int]:
  """(wall seconds, peak RSS in bytes) of ``python -m module args`` in a child process."""
  start = time.perf_counter()
  done = subprocess.run(
      [sys.executable, "-c", _MEASURED, module, *args], capture_output=True, text=True, check=False
  )
  seconds = time.perf_counter() - start
  if done.returncode:
    raise SystemExit(f"{module} {' '.join(args)} failed:\n{done.stderr[-3000:]}")
  kib = int(done.stderr.rsplit("peak_rss_kib=", 1)[1].split()[0])
  return seconds, kib * 1024


def main(argv):
  del argv
  root = pathlib.Path(_DIR.value or tempfile.mkdtemp(prefix="midms-export-bench-"))
  workdir, out = root / "workdir", root / "export"
  model_bytes, state_bytes = write_workdir(_CONFIG.value, workdir)
  # Baseline: the same export of the tiny synthetic model (the interpreter, jax, orbax, torch,
  # TensorFlow).
  write_workdir(synthetic.get_config(), root / "tiny")
  _, import_rss = peak_rss_of(
      "midms_jax.export", f"--workdir={root / 'tiny'}", f"--out={root / 'tiny_export'}"
  )
  seconds, peak_rss = peak_rss_of(
      "midms_jax.export",
      f"--workdir={workdir}",
      f"--out={out}",
      f"--official_layout={_LAYOUT.value}",
  )
  files = {p.name: p.stat().st_size for p in sorted(out.iterdir())}
  print(
      json.dumps(
          dict(
              config=_CONFIG.value.data.name,
              layout=_LAYOUT.value,
              export_s=round(seconds, 1),
              model_mb=round(model_bytes / 2**20),
              checkpoint_state_mb=round(state_bytes / 2**20),
              import_rss_mb=round(import_rss / 2**20),
              peak_rss_mb=round(peak_rss / 2**20),
              export_rss_over_model=round((peak_rss - import_rss) / model_bytes, 2),
              files_mb={k: round(v / 2**20) for k, v in files.items()},
              dir=str(root),
          )
      )
  )


if __name__ == "__main__":
  platform_tuning.set_xla_flags()
  app.run(main)
