"""Command-line plumbing shared by the tools: absl flag errors as one ``error:`` line with exit
status 2, and an in-process entry point (tests, notebooks) that parses a fresh argv every call.

Config files (``config_flags.DEFINE_config_file``): a missing or broken config file and an
override of a field the config does not have (``--config.train.nonexistent=1``) are one line too:
``parse_flags`` catches what ml_collections raises while parsing, ``config_value`` what it defers to
the first use of the value. ``split_overrides`` / ``apply_overrides`` apply ``--config.<field>``
overrides to a config that comes from elsewhere (a training workdir's config.json). ``unwritable``
checks an output path before any slow work, without creating anything.
"""

import copy
import os
import pathlib
import re
import sys
import traceback
from typing import Any, Callable, Sequence

from absl import flags
from ml_collections import ConfigDict, config_flags
from ml_collections.config_flags import config_flags as config_flags_lib, config_path

from midms_jax.errors import InputError

HELP_FLAGS = ("-h", "--help", "-help", "--helpshort", "--helpfull")


# ------------------------------------------------------------------------------------------------
# One-line messages
# ------------------------------------------------------------------------------------------------


def one_line(error: BaseException | str) -> str:
  """The message of ``error`` on one line: its first line, or for a message that carries a traceback
  (ml_collections re-raises config-file errors so) the traceback's last line, the exception."""
  text = str(error).strip()
  if not text:
    return type(error).__name__ if isinstance(error, BaseException) else ""
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  if "Traceback (most recent call last):" in text:
    # absl's "flag --config=...: " before ml_collections' text
    head = lines[0].split("Error whilst parsing config file:")[0].strip()
    return f"{head} {lines[-1]}" if head else lines[-1]
  return lines[0]


def _given(argv: Sequence[str], name: str) -> str | None:
  """The value of ``--name=value`` / ``--name value`` in ``argv`` (the last one), or None."""
  value = None
  for i, arg in enumerate(argv):
    match = re.fullmatch(rf"--?{re.escape(name)}(=(.*))?", arg, re.DOTALL)
    if match:
      value = match.group(2) if match.group(1) else (argv[i + 1] if i + 1 < len(argv) else "")
  return value


def gives_flag(argv: Sequence[str], name: str) -> bool:
  """Whether ``argv`` (program name first) sets ``--name`` itself (not a ``--name.<field>``)."""
  return _given(list(argv)[1:], name) is not None


def _override_fields(argv: Sequence[str], name: str) -> list[str]:
  """The field paths of the ``--name.<field>`` overrides in ``argv``, in order."""
  fields = []
  for arg in argv:
    match = re.match(rf"--?(?:no)?{re.escape(name)}\.([^=]+)", arg)
    if match:
      fields.append(match.group(1))
  return fields


def override_problem(config: Any, field: str, name: str = "config") -> str | None:
  """Why ``--name.<field>`` cannot override ``config`` (a one-line message), None when it can."""
  try:
    keys = config_path.split(field)
  except Exception:  # pylint: disable=broad-except  # ml_collections' path grammar
    return f"--{name}.{field}: not a field path (e.g. --{name}.train.batch_size=8)"
  node, walked = config, []
  for key in keys:
    if not isinstance(key, str):  # an index into a tuple: ml_collections checks it
      return None
    if not isinstance(node, (ConfigDict, dict)):
      return (
          f"--{name}.{field}: {'.'.join(walked)} is a value ({type(node).__name__}), not a "
          "section of the config"
      )
    if key not in node:
      where = f" in {'.'.join(walked)}" if walked else ""
      return f"--{name}.{field}: config has no field {key!r}{where}"
    node = node[key]
    walked.append(key)
  return None


def _config_file_problem(spec: str, name: str) -> tuple[str | None, Any]:
  """(why ``--name=spec`` gives no config, None when it loads; the loaded config)."""
  path = spec.split(":", 1)[0]
  shown = f"--{name}={spec}"
  if not path:
    return f"--{name}: empty path; name a config file, e.g. configs/synthetic.py", None
  if not os.path.exists(path):
    return f"{shown}: no such config file", None
  if not os.path.isfile(path):
    return f"{shown}: not a config file (a folder?)", None
  try:
    config = config_flags_lib.ConfigFileFlagParser(name, lock_config=False).parse(spec)
    if config is not None:
      config.get("")  # ml_collections defers load errors (an unreadable file) to the first use
  except Exception as e:  # pylint: disable=broad-except  # anything a config module raises
    return f"{shown}: cannot load the config: {one_line(e)}", None
  if config is None:
    return f"{shown}: get_config() returned None (a missing return statement?)", None
  return None, config


def config_error(flag_values: flags.FlagValues, argv: Sequence[str], error: BaseException) -> str:
  """One line for an ``error`` raised while parsing ``argv``: a config flag's file that is missing
  or does not load, or an override of a field that its config lacks; else ``error``'s first line."""
  for flag_name in list(flag_values):
    flag = flag_values[flag_name]
    if flag_name != flag.name or not config_flags_lib.is_config_flag(flag):
      continue
    spec = _given(argv[1:], flag.name)
    if spec is None:
      spec = getattr(flag, "default_unparsed", None)
    if isinstance(spec, str):
      problem, config = _config_file_problem(spec, flag.name)
      if problem:
        return problem
    elif isinstance(spec, ConfigDict):
      config = spec
    else:
      fields = _override_fields(argv[1:], flag.name)
      if fields:
        return f"--{flag.name}.{fields[0]}: an override needs --{flag.name} (a config file)"
      continue
    for field in _override_fields(argv[1:], flag.name):
      problem = override_problem(config, field, flag.name)
      if problem:
        return problem
  if isinstance(error, flags.Error):
    return one_line(error)
  return f"{type(error).__name__}: {one_line(error)}"


# ------------------------------------------------------------------------------------------------
# Parsing
# ------------------------------------------------------------------------------------------------


def parse_flags(
    flag_values: flags.FlagValues, argv: Sequence[str], doc: str | None = None
) -> list[str]:
  """Parses ``argv`` into ``flag_values``; a bad flag prints one ``error:`` line and exits with 2
  (absl: 1).

  Also one line: a config flag's file that does not exist or does not load, and an override of a
  field the config lacks (ml_collections raises AttributeError / KeyError / IOError for them while
  parsing). ``--help`` prints ``doc`` and the flags and exits with 0 (for a tool with its own
  ``FlagValues``, which absl's help does not know). Usable as ``absl.app.run``'s ``flags_parser``.
  """
  if doc is not None and any(arg in HELP_FLAGS for arg in argv[1:]):
    print(f"{doc.strip()}\n\nflags:\n{flag_values.get_help()}")
    sys.exit(0)
  try:
    return flag_values(list(argv))
  except flags.Error as e:
    about_config = _names_a_config_flag(flag_values, e)
    message = config_error(flag_values, argv, e) if about_config else one_line(e)
  except Exception as e:  # pylint: disable=broad-except  # ml_collections' config files, overrides
    message = config_error(flag_values, argv, e)
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _names_a_config_flag(flag_values: flags.FlagValues, error: flags.Error) -> bool:
  """Whether absl's ``error`` is about a config flag's file (its TypeError / ValueError)."""
  text = str(error)
  return any(
      config_flags_lib.is_config_flag(flag_values[name]) and text.startswith(f"flag --{name}=")
      for name in list(flag_values)
  )


def config_value(holder: flags.FlagHolder, required: bool = False) -> ConfigDict | None:
  """The config of a parsed ``config_flags.DEFINE_config_file`` flag, or an ``InputError`` whose
  one line names the flag: ``--config=configs/nope.py: no such config file`` (ml_collections only
  raises when the value is first used). None when the flag is not set and not ``required``."""
  try:
    value = holder.value
  except Exception as e:  # pylint: disable=broad-except
    raise InputError(f"--{holder.name}: {one_line(e)}") from None
  if value is None and holder.present:
    flag_values = getattr(holder, "_flagvalues", flags.FLAGS)  # pylint: disable=protected-access
    spec = config_flags.get_config_filename(flag_values[holder.name])
    raise InputError(
        f"--{holder.name}={spec}: get_config() returned None (a missing return " "statement?)"
    )
  if value is None:
    if required:
      raise InputError(f"--{holder.name} is required (a config file, e.g. configs/synthetic.py)")
    return None
  try:
    value.get("")  # an unloadable file is an object that raises on every use
  except Exception:  # pylint: disable=broad-except
    flag_values = getattr(holder, "_flagvalues", flags.FLAGS)  # pylint: disable=protected-access
    spec = config_flags.get_config_filename(flag_values[holder.name])
    problem, _ = _config_file_problem(spec, holder.name)
    raise InputError(problem or f"--{holder.name}={spec}: cannot load the config") from None
  return value


def load_config_file(spec: str, name: str = "config") -> ConfigDict:
  """The config of a config file ``path[:variant]`` as ``--name=spec`` would give it (locked), or an
  ``InputError`` with one line: for a tool whose ``--name`` has a default that it loads itself."""
  problem, config = _config_file_problem(spec, name)
  if problem:
    raise InputError(problem)
  config.lock()
  return config


def split_overrides(argv: Sequence[str], name: str = "config") -> tuple[list[str], list[str]]:
  """``argv`` without its ``--name.<field>`` overrides, and the overrides (``--name.f=v``,
  ``--name.f v``, ``--name.flag`` / ``--noname.flag``): for a tool whose config may come from
  elsewhere than ``--name`` (``apply_overrides``)."""
  rest, overrides = [], []
  args = list(argv)
  i = 0
  while i < len(args):
    arg = args[i]
    if re.match(rf"--?(?:no)?{re.escape(name)}\.", arg):
      overrides.append(arg)
      if "=" not in arg and i + 1 < len(args) and not args[i + 1].startswith("-"):
        overrides.append(args[i + 1])  # "--config.field value"
        i += 1
    else:
      rest.append(arg)
    i += 1
  return rest, overrides


def deferred_overrides(argv: Sequence[str], name: str = "config") -> tuple[list[str], list[str]]:
  """``split_overrides(argv)`` when ``argv`` does not set ``--name`` itself (the overrides then
  apply to a config the tool finds elsewhere), else ``(argv, [])``."""
  if gives_flag(argv, name):
    return list(argv), []
  return split_overrides(argv, name)


def apply_overrides(
    config: ConfigDict, overrides: Sequence[str], name: str = "config"
) -> ConfigDict:
  """A copy of ``config`` with ``--name.<field>=<value>`` ``overrides`` applied as ml_collections
  applies them to a config file (values parsed by the field's type; no new fields); ``config``
  itself when there are none. An ``InputError`` with one line for a field the config lacks or a
  value of the wrong type."""
  if not overrides:
    return config
  argv = ["overrides", *overrides]
  values = flags.FlagValues()
  try:
    config_flags.DEFINE_config_dict(name, copy.deepcopy(config), flag_values=values, sys_argv=argv)
    values(argv)
  except Exception as e:  # pylint: disable=broad-except  # AttributeError / KeyError / flags.Error
    problems = (override_problem(config, field, name) for field in _override_fields(argv[1:], name))
    raise InputError(next((p for p in problems if p), None) or one_line(e)) from None
  return values[name].value


# ------------------------------------------------------------------------------------------------
# Outputs
# ------------------------------------------------------------------------------------------------


def unwritable(path: str | os.PathLike, folder: bool = False) -> str | None:
  """Why ``path`` (a file, or with ``folder`` a folder, to be written, its missing parents created)
  cannot be written, or None; nothing is created. Checked: the nearest existing ancestor is a folder
  this process may write into, and an existing ``path`` is of the right kind (an existing file is
  replaced by renaming a new one over it: its folder decides). (Writes may still fail, e.g. on a
  full disk or for root on a read-only mount: catch ``OSError`` where the files are written too.)"""
  path = pathlib.Path(path).expanduser().absolute()
  try:
    if path.exists():
      if folder and not path.is_dir():
        return "it is a file, not a folder"
      if not folder and path.is_dir():
        return "it is a folder, not a file"
      if folder:
        return None if os.access(path, os.W_OK | os.X_OK) else "permission denied"
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
      ancestor = ancestor.parent
    if not ancestor.is_dir():
      return f"{ancestor} is a file, not a folder"
    if not os.access(ancestor, os.W_OK | os.X_OK):
      return f"permission denied in {ancestor}"
  except OSError as e:  # e.g. a parent that cannot be searched
    return f"{e.filename or path}: {e.strerror or e}"
  return None


def check_writable(path: str | os.PathLike, flag: str, folder: bool = False) -> None:
  """An ``InputError`` ``<path>: cannot write <flag> there: <reason>`` where ``unwritable``."""
  reason = unwritable(path, folder)
  if reason:
    raise InputError(f"{pathlib.Path(path).expanduser()}: cannot write {flag} there: {reason}")


def os_error_line(error: OSError, what: str = "") -> str:
  """``<file>: <what>: <reason>`` for an ``OSError`` that reached a tool's ``main`` (a write that
  failed after the checks, e.g. a full disk)."""
  where = error.filename or ""
  reason = error.strerror or one_line(error)
  return ": ".join(part for part in (str(where), what, reason) if part)


def _is_closed_loop_callback(unraisable: Any) -> bool:
  """Whether an unraisable exception is asyncio's "Event loop is closed" of a late callback."""
  if not (
      isinstance(unraisable.exc_value, RuntimeError)
      and str(unraisable.exc_value) == "Event loop is closed"
  ):
    return False
  frames = traceback.extract_tb(unraisable.exc_traceback) if unraisable.exc_traceback else []
  return any(frame.name == "call_soon_threadsafe" for frame in frames) or not frames


def ignore_closed_loop_callbacks() -> None:
  """Drops the ``RuntimeError: Event loop is closed`` tracebacks that follow a failed orbax restore
  (a damaged checkpoint file): orbax runs the restore in an event loop that it closes as soon as one
  read fails (``asyncio_utils._run_sync_via_new_loop``), and the reads still in flight in
  TensorStore's threads then call ``loop.call_soon_threadsafe`` on the closed loop; Python prints
  each such exception as "unraisable" (up to 90 lines after the tool's own ``error:`` line, in about
  half the runs). Every other unraisable exception still reaches the previous
  ``sys.unraisablehook``. Idempotent."""
  previous = sys.unraisablehook
  if getattr(previous, "_drops_closed_loop_callbacks", False):
    return

  def hook(unraisable: Any) -> None:
    if not _is_closed_loop_callback(unraisable):
      previous(unraisable)

  hook._drops_closed_loop_callbacks = True  # pylint: disable=protected-access
  sys.unraisablehook = hook


def run_in_process(
    flag_values: flags.FlagValues,
    main: Callable[[list[str]], int],
    argv: Sequence[str],
    doc: str | None = None,
) -> int:
  """Parses ``argv`` (program name first) afresh, every flag not given taking its default, runs
  ``main`` on the remaining arguments and returns its exit status.

  ``sys.argv`` is ``argv`` meanwhile: ml_collections reads ``--config.*`` overrides from there and
  defines a flag for each, so the previous call's override flags are removed first.
  """
  for name in [name for name in flag_values if name.startswith("config.")]:
    delattr(flag_values, name)
  flag_values.unparse_flags()
  saved, sys.argv = sys.argv, list(argv)
  try:
    try:
      remaining = parse_flags(flag_values, argv, doc)
    except SystemExit as e:
      return int(e.code)
    return main(remaining)
  finally:
    sys.argv = saved
