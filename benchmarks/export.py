"""Export benchmark: wall time and peak host memory of ``python -m midms_jax.export`` on a full-size workdir.

    python benchmarks/export.py --config=configs/celebahq.py            # 354M-parameter model, ~4 GB checkpoint
    python benchmarks/export.py --config=configs/synthetic.py           # seconds

Writes a training workdir with random weights and a real AdamW state (what ``train.py`` saves), then
runs the export CLI in a subprocess and reads its peak resident memory. The figure to compare is
``peak_rss - import_rss`` (the interpreter with jax, torch and orbax imported, measured the same way)
against the model's bytes and the checkpoint's (model + optimiser) bytes. Prints one JSON line.
"""

import json
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags
from ml_collections import config_flags

from midms_jax import optim, train_step, workdir as workdir_lib
from midms_jax.models import build

_CONFIG = config_flags.DEFINE_config_file("config", "configs/celebahq.py", "model config")
_LAYOUT = flags.DEFINE_enum("official_layout", "full", ["full", "minimal"], "passed to the export")
_DIR = flags.DEFINE_string("dir", None, "where the workdir and the export go (default: a temporary folder)")


def _bytes(tree) -> int:
  return sum(int(np.size(x)) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))


def write_workdir(config, workdir: pathlib.Path) -> tuple[int, int]:
  """A workdir as training leaves it (random weights); returns (model bytes, checkpoint state bytes)."""
  workdir.mkdir(parents=True)
  workdir_lib.write_config(workdir, config)
  variables = build.init_variables(config.model, jax.random.PRNGKey(0))
  workdir_lib.save_first_stage(workdir, variables["first_stage"])
  state = train_step.create_train_state(variables, optim.make_optimizer(config.train, freeze_unet=True))
  model_bytes = _bytes(variables)
  state_bytes = _bytes(state)
  del variables
  with ocp.CheckpointManager(workdir / workdir_lib.CHECKPOINTS_DIR, item_names=("state", "data")) as manager:
    manager.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave({})))
    manager.wait_until_finished()
  return model_bytes, state_bytes


def peak_rss_of(cmd: list[str]) -> tuple[float, int]:
  """(wall seconds, peak RSS in bytes) of a child process (Linux ``ru_maxrss`` is in KiB)."""
  start = time.perf_counter()
  done = subprocess.run(cmd, capture_output=True, text=True, check=False)
  seconds = time.perf_counter() - start
  if done.returncode:
    raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
  return seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


def main(argv):
  del argv
  root = pathlib.Path(_DIR.value or tempfile.mkdtemp(prefix="midms-export-bench-"))
  workdir, out = root / "workdir", root / "export"
  model_bytes, state_bytes = write_workdir(_CONFIG.value, workdir)
  # RUSAGE_CHILDREN is the maximum over all children so far: measure the smaller one first.
  _, import_rss = peak_rss_of([sys.executable, "-c", "import torch, midms_jax.export"])
  seconds, peak_rss = peak_rss_of([sys.executable, "-m", "midms_jax.export", f"--workdir={workdir}", f"--out={out}",
                                   f"--official_layout={_LAYOUT.value}"])
  files = {p.name: p.stat().st_size for p in sorted(out.iterdir())}
  print(json.dumps(dict(
      config=_CONFIG.value.data.name, layout=_LAYOUT.value, export_s=round(seconds, 1),
      model_mb=round(model_bytes / 2**20), checkpoint_state_mb=round(state_bytes / 2**20),
      import_rss_mb=round(import_rss / 2**20), peak_rss_mb=round(peak_rss / 2**20),
      export_rss_over_model=round((peak_rss - import_rss) / model_bytes, 2),
      files_mb={k: round(v / 2**20) for k, v in files.items()}, dir=str(root))))


if __name__ == "__main__":
  app.run(main)
