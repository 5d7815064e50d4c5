"""What the command-line tools print on stderr: this project's log lines, without the libraries'
chatter.

Orbax, TensorFlow Datasets, grain and JAX log many INFO lines per checkpoint or data set (174 of the
240 stderr lines of a short training run were orbax's); among them the warnings that matter (a
checkpoint set aside, SIGTERM) were lost. ``configure`` keeps INFO lines from ``midms_jax`` (and the
launch scripts), drops the libraries' lines below WARNING unless ``library_logs`` is set
(``--library_logs`` on every tool), and prints every warning and error as its own ``warning: ...``
line without absl's prefix, so it stands out.
"""

import logging
import pathlib

from absl import flags
from absl import logging as absl_logging

# midms_jax/, launch/, configs/ are inside
_PROJECT = str(pathlib.Path(__file__).resolve().parents[1])
_OWN_DIRS = tuple(f"{_PROJECT}/{name}/" for name in ("midms_jax", "launch", "configs"))


def define_flag(flag_values: flags.FlagValues = flags.FLAGS) -> flags.FlagHolder:
  """``--library_logs`` on ``flag_values`` (once; the existing holder's value is read by
  ``configure``)."""
  if "library_logs" in flag_values:
    return flags.FlagHolder(flag_values, flag_values["library_logs"])
  return flags.DEFINE_bool(
      "library_logs",
      False,
      "also show the INFO lines of orbax, TFDS, grain, JAX and "
      "other libraries (hidden by default; their warnings are always shown)",
      flag_values=flag_values,
  )


def is_own(record: logging.LogRecord) -> bool:
  """Whether ``record`` was logged by this project's code (absl logs every library as the logger
  "absl")."""
  return str(record.pathname).startswith(_OWN_DIRS)


class _LibraryInfoFilter(logging.Filter):
  """Drops library records below WARNING (unless ``show_library``)."""

  def __init__(self):
    super().__init__("midms_jax.logs")
    self.show_library = False

  def filter(self, record: logging.LogRecord) -> bool:
    return self.show_library or record.levelno >= logging.WARNING or is_own(record)


class _WarningsStandOut(logging.Formatter):
  """``warning: <message>`` / ``error: <message>`` for WARNING and above; absl's format for the
  rest."""

  def __init__(self, base: logging.Formatter):
    super().__init__()
    self.base = base

  def format(self, record: logging.LogRecord) -> str:
    if record.levelno >= logging.WARNING:
      word = "warning" if record.levelno == logging.WARNING else "error"
      return f"{word}: {record.getMessage()}"
    return self.base.format(record)


_FILTER = _LibraryInfoFilter()


def configure(library_logs: bool = False) -> None:
  """Installs the filter and the formatter on absl's handler (idempotent; also for in-process runs).
  INFO lines are shown: the tools' progress lines are INFO."""
  absl_logging.use_absl_handler()  # on the root logger, as under absl.app.run
  # Tools parsing their own FlagValues (not absl's global ones) would get absl's "Logging before
  # flag parsing goes to stderr." line first; it says nothing to a user.
  absl_logging._warn_preinit_stderr = False  # pylint: disable=protected-access
  handler = absl_logging.get_absl_handler()
  _FILTER.show_library = library_logs
  if _FILTER not in handler.filters:
    handler.addFilter(_FILTER)
  python_handler = handler.python_handler
  if not isinstance(python_handler.formatter, _WarningsStandOut):
    python_handler.setFormatter(
        _WarningsStandOut(python_handler.formatter or absl_logging.PythonFormatter())
    )
  absl_logging.set_verbosity(absl_logging.INFO)
  # absl's logger and the root logger, which JAX, TF and grain log through
  for name in (
      "absl",
      "",
  ):
    logging.getLogger(name).setLevel(logging.INFO)
