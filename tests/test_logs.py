"""What the tools print on stderr: this project's INFO lines, the libraries' hidden, warnings as one
line."""

import io
import logging
import pathlib
import sys

import pytest
from absl import logging as absl_logging

import midms_jax
from midms_jax import logs

OWN_FILE = str(pathlib.Path(midms_jax.__file__).with_name("train.py"))
LIBRARY_FILE = "/usr/lib/python3/site-packages/orbax/checkpoint/checkpoint_manager.py"


def _emit(pathname: str, level: int, message: str) -> None:
  record = logging.LogRecord("absl", level, pathname, 1, message, None, None)
  absl_logging.get_absl_handler().handle(record)


@pytest.fixture
def configured():
  yield logs.configure
  logs.configure(library_logs=False)


@pytest.fixture
def stderr(monkeypatch) -> io.StringIO:
  """What absl's handler prints: it writes to its stream, or to ``sys.stderr`` before absl's flags
  are parsed; both are one buffer here (other tests' captures may have left the handler a stale
  stream).
  """
  buffer = io.StringIO()
  monkeypatch.setattr(sys, "stderr", buffer)
  monkeypatch.setattr(absl_logging.get_absl_handler().python_handler, "stream", buffer)
  return buffer


def test_library_info_is_hidden_and_warnings_stand_out(configured, stderr):
  configured(library_logs=False)
  _emit(OWN_FILE, logging.INFO, "own progress line")
  _emit(LIBRARY_FILE, logging.INFO, "Saving checkpoint for step 3")
  _emit(LIBRARY_FILE, logging.WARNING, "a library warning")
  _emit(OWN_FILE, logging.WARNING, "checkpoint 6 is unreadable")
  lines = stderr.getvalue().strip().splitlines()
  assert len(lines) == 3 and lines[0].endswith("train.py:1] own progress line")
  assert lines[1:] == ["warning: a library warning", "warning: checkpoint 6 is unreadable"]


def test_library_logs_flag_brings_them_back(configured, stderr):
  configured(library_logs=True)
  _emit(LIBRARY_FILE, logging.INFO, "Saving checkpoint for step 3")
  assert stderr.getvalue().strip().endswith("checkpoint_manager.py:1] Saving checkpoint for step 3")
