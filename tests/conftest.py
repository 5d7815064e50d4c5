"""Shared test fixtures: the official parity data (copied from shared/fixtures/official_parity), and
the background jobs of the slowest subprocess tests."""

import concurrent.futures
import os
import pathlib
import shutil
import subprocess
import tempfile
import threading
from typing import Any, Callable

# One persistent XLA compilation cache for the session, shared with the subprocesses the tests start
# (they inherit the environment): the training tests compile the same steps in several processes.
# Removed at the end of the session unless the caller chose the directory.
_OWN_CACHE_DIR = (
    None
    if "JAX_COMPILATION_CACHE_DIR" in os.environ
    else tempfile.mkdtemp(prefix="midms-jax-test-cache-")
)
if _OWN_CACHE_DIR:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE_DIR
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")

from midms_jax import platform_tuning  # pylint: disable=wrong-import-position

platform_tuning.set_xla_flags()  # as the command-line tools do; the subprocesses inherit them

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import pytest  # pylint: disable=wrong-import-position

from midms_jax.midms import model as midms  # pylint: disable=wrong-import-position

# Parity tolerances assume exact float32 matmuls (TF32/bf16 on accelerators would not meet them).
jax.config.update("jax_default_matmul_precision", "highest")

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


def nchw_to_nhwc(x: np.ndarray) -> np.ndarray:
  return np.transpose(x, (0, 2, 3, 1))


def nhwc_to_nchw(x) -> np.ndarray:
  return np.transpose(np.asarray(x), (0, 3, 1, 2))


def assert_close(actual, expected, atol: float, name: str = "") -> float:
  """Asserts max |actual - expected| <= atol and returns that error relative to atol."""
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
  err = (
      float(np.max(np.abs(actual.astype(np.float64) - expected.astype(np.float64))))
      if actual.size
      else 0.0
  )
  report = os.environ.get("MIDMS_PARITY_REPORT")
  if report:  # e.g. MIDMS_PARITY_REPORT=/tmp/parity.tsv pytest tests: one line per comparison
    with open(report, "a", encoding="utf-8") as f:
      f.write(
          f"{os.environ.get('PYTEST_CURRENT_TEST', '').split(' ')[0]}\t{name}\t{err:.3g}\t{atol:.3g}\t{err / atol:.4f}\n"
      )
  assert err <= atol, f"{name}: max abs error {err:.3g} > tolerance {atol:.3g}"
  return err / atol


def load_fixture(name: str) -> dict[str, np.ndarray]:
  with np.load(FIXTURES / name, allow_pickle=False) as data:
    return dict(data)


@pytest.fixture(scope="session")
def midms_checkpoint_path() -> pathlib.Path:
  return FIXTURES / "midms_small.pth"


@pytest.fixture(scope="session")
def vq_checkpoint_path() -> pathlib.Path:
  return FIXTURES / "vq_small.ckpt"


@pytest.fixture(scope="session")
def midms_state_dict(midms_checkpoint_path) -> dict[str, np.ndarray]:
  """The official small MIDMs state dict as float numpy arrays (PyTorch layout)."""
  torch = pytest.importorskip("torch")
  ckpt = torch.load(midms_checkpoint_path, map_location="cpu", weights_only=True)
  return {k: v.numpy() for k, v in ckpt["state_dict"].items()}


@pytest.fixture(scope="session")
def ldm_checkpoint_path(tmp_path_factory, midms_checkpoint_path) -> pathlib.Path:
  """The official ``ldm_small.ckpt``, rebuilt from ``midms_small.pth`` to keep the repository small.

  The fixture README states that ``diff_model.*`` of the MIDMs checkpoint equals ``ldm_small.ckpt``
  exactly (MIDMs loaded it); the Lightning layout is ``{state_dict, global_step, epoch}``.
  """
  torch = pytest.importorskip("torch")
  ckpt = torch.load(midms_checkpoint_path, map_location="cpu", weights_only=True)
  prefix = "diff_model."
  state = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
  path = tmp_path_factory.mktemp("ldm") / "ldm_small.ckpt"
  torch.save({"state_dict": state, "global_step": 0, "epoch": 0}, path)
  return path


def forward_inputs(io) -> dict[str, np.ndarray]:
  """The ``in/*`` images and conditions of midms_forward_io.npz, NHWC."""
  return {
      k: nchw_to_nhwc(io[f"in/{k}"])
      for k in ("src_img", "ref_img", "input_semantics", "ref_semantics")
  }


def forward_noise(io, mode: str, model):
  """Maps the stored draws (in official call order) to our named draws, checked by their tags."""
  draws, tags = io[f"{mode}/noise"], list(io[f"{mode}/noise_tags"])

  def pick(i: int, tag: str) -> np.ndarray:
    assert tags[i].startswith(tag), f"draw {i} is {tags[i]}, not {tag}"
    return nchw_to_nhwc(draws[i])

  zeros = np.zeros_like(nchw_to_nhwc(draws[0]))
  if mode == "train":
    refine = np.zeros((model.refine.t.shape[0],) + zeros.shape, np.float32)
    return midms.Noise(
        pick(0, "q_sample t=311"),
        pick(2, "q_sample t=311"),
        pick(8, "q_sample t=187"),
        zeros,
        refine,
    )
  refine_steps = np.stack([pick(13 + j, "ddim_step") for j in range(20)])
  return midms.Noise(
      pick(0, "q_sample t=311"), zeros, zeros, pick(12, "q_sample t=101"), refine_steps
  )


@pytest.fixture(scope="session")
def forward_io() -> dict[str, np.ndarray]:
  return load_fixture("midms_forward_io.npz")


@pytest.fixture(scope="session")
def tiny_midms(midms_checkpoint_path):
  """(config, MIDMs, variables) of ``celebahq.py:tiny`` with the official small checkpoint
  imported."""
  from configs import celebahq  # pylint: disable=import-outside-toplevel
  from midms_jax.interop import torch_import  # pylint: disable=import-outside-toplevel

  config = celebahq.get_config("tiny")
  variables = torch_import.load_midms_checkpoint(midms_checkpoint_path, config.model)
  return (
      config,
      midms.MIDMs.from_config(config),
      jax.tree_util.tree_map(jax.numpy.asarray, variables),
  )


# The LDM stage and the held-out scoring of the shortened synthetic run (tests/test_train.py passes
# the same as CLI flags).
SHORT_LDM = dict(num_steps=4, log_every=2, image_every=2, checkpoint_every=2)
SHORT_EVALUATE = dict(results_pairs=4, batch_size=4, refine=False)


def synthetic_train_config(stage: str = "ldm+midms", **train_overrides):
  """``configs/synthetic.py`` (LDM stage, then MIDMs from its export) shortened to a few steps: 4
  LDM steps; MIDMs warm-up for 3, then the interleaved step. ``stage="midms"``: the MIDMs stage
  alone, from random weights.
  """
  from configs import synthetic  # pylint: disable=import-outside-toplevel

  config = synthetic.get_config()
  config.ldm.update(SHORT_LDM)
  config.evaluate.update(SHORT_EVALUATE)
  config.stage = stage
  if stage == "midms":
    config.checkpoints.ldm = ""
  # warmup_iter as the CLI tests' (tests/test_train.py SHORT): the same compiled steps (shared
  # cache)
  config.train.update(
      dict(batch_size=2, num_steps=6, warmup_iter=3, log_every=1, checkpoint_every=3, image_every=3)
  )
  config.train.update(train_overrides)
  return config


@pytest.fixture(scope="session")
def synthetic_run(tmp_path_factory):
  """(workdir, last metrics) of one short synthetic training run (4 LDM steps, then 6 MIDMs steps
  with checkpoints at steps 3 and 6), shared by the training, workdir, export and translate
  tests."""
  from midms_jax import train  # pylint: disable=import-outside-toplevel

  workdir = tmp_path_factory.mktemp("synthetic_run")
  return workdir, train.train_and_evaluate(synthetic_train_config(), workdir)


class BackgroundJob:
  """What a background launcher gets: a directory of its own, the environment at session start
  (tests may change ``os.environ`` meanwhile) and subprocesses that are killed when the session
  ends."""

  def __init__(self, directory: pathlib.Path, environ: dict[str, str], jobs: "BackgroundJobs"):
    directory.mkdir()
    self.dir, self.environ, self._jobs = directory, environ, jobs

  def popen(self, args: list[str], **kwargs) -> subprocess.Popen:
    return self._jobs.popen(args, **{"env": self.environ, "stdin": subprocess.DEVNULL, **kwargs})

  def run(self, args: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(args, capture_output=True, text=True, timeout=timeout)`` through
    ``popen``."""
    with self.popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs
    ) as proc:
      try:
        stdout, stderr = proc.communicate(timeout=timeout)
      except BaseException:
        proc.kill()
        raise
    return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)


Launcher = Callable[[BackgroundJob], Any]


class BackgroundJobs:
  """Runs the launchers of the selected ``@pytest.mark.background(launcher=...)`` tests one at a
  time, in test order, in a worker thread from the start of the session: their subprocesses (mostly
  single-threaded XLA compiles) use the second core while the in-process tests run, and the marked
  tests only check the results."""

  def __init__(self, launchers: dict[str, Launcher]):
    self._root = pathlib.Path(tempfile.mkdtemp(prefix="midms-jax-test-background-"))
    self._lock = threading.Lock()
    self._procs: list[subprocess.Popen] = []
    self._closed = False
    self._executor = concurrent.futures.ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="background-test"
    )
    environ = dict(os.environ)
    self.results = {
        node_id: self._executor.submit(launch, BackgroundJob(self._root / str(i), environ, self))
        for i, (node_id, launch) in enumerate(launchers.items())
    }

  def popen(self, args: list[str], **kwargs) -> subprocess.Popen:
    with self._lock:
      if self._closed:
        raise RuntimeError("the test session has ended")
      proc = subprocess.Popen(args, **kwargs)  # pylint: disable=consider-using-with
      self._procs.append(proc)
    return proc

  def close(self) -> None:
    """Kills what is still running (after ``-x`` or Ctrl-C), drops the jobs not started, removes the
    files."""
    with self._lock:
      self._closed = True
      for proc in self._procs:
        proc.kill()
    self._executor.shutdown(wait=True, cancel_futures=True)
    shutil.rmtree(self._root, ignore_errors=True)


_BACKGROUND = pytest.StashKey[BackgroundJobs]()


def pytest_configure(config: pytest.Config) -> None:
  config.addinivalue_line(
      "markers",
      "background(launcher): run launcher(BackgroundJob) from the session start "
      "(a keyword: a lone callable would be taken for the decorated test); "
      "the test gets its result from the background fixture",
  )


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session: pytest.Session) -> None:
  """Starts the jobs of the selected tests only (after -k, --deselect, ...; none for
  --collect-only)."""
  marked = {item.nodeid: item.get_closest_marker("background") for item in session.items}
  launchers = {node_id: marker.kwargs["launcher"] for node_id, marker in marked.items() if marker}
  if launchers and not session.config.option.collectonly:
    session.config.stash[_BACKGROUND] = BackgroundJobs(launchers)


def pytest_sessionfinish(session: pytest.Session) -> None:
  jobs = session.config.stash.get(_BACKGROUND, None)
  if jobs is not None:
    jobs.close()
  if _OWN_CACHE_DIR:
    shutil.rmtree(_OWN_CACHE_DIR, ignore_errors=True)


@pytest.fixture
def background(request) -> Callable[[], Any]:
  """Waits for the test's background launcher and gives its result; called in the test's body, so
  that the launcher's exceptions fail the test (rather than its setup)."""
  jobs = request.config.stash.get(_BACKGROUND, None)
  assert (
      jobs is not None and request.node.nodeid in jobs.results
  ), "needs @pytest.mark.background(launcher=...)"
  return jobs.results[request.node.nodeid].result
