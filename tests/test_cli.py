"""midms_jax/cli.py: config-file and override errors as one ``error:`` line, overrides applied to a
config from elsewhere, the output checks, and the filter for orbax's late "Event loop is closed"
callbacks."""

import asyncio
import pathlib
import sys
import types

import pytest
from absl import flags
from ml_collections import ConfigDict, config_flags

from midms_jax import cli
from midms_jax.errors import InputError

CONFIG_FILE = """
import ml_collections

def get_config(variant=""):
  if variant not in ("", "small"):
    raise ValueError(f"unknown variant {variant!r}")
  return ml_collections.ConfigDict(dict(
      name="x", train=dict(batch_size=8 if not variant else 2, lr=0.5, flip=True, sizes=(1, 2))))
"""


@pytest.fixture
def config_file(tmp_path) -> pathlib.Path:
  path = tmp_path / "config.py"
  path.write_text(CONFIG_FILE)
  return path


def _tool():
  """A tool as the modules define one: its own flags with a config file flag; main keeps the
  config."""
  values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, "config file", flag_values=values)
  seen = {}

  def main(argv):
    del argv
    try:
      seen["config"] = cli.config_value(holder, required=True)
    except InputError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    return 0

  return values, main, seen


def _error(capsys) -> str:
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("error: "), err
  return err.strip()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config={tmp}/nope.py"], "error: --config={tmp}/nope.py: no such config file"),
        (
            ["--config={tmp}/nope.py", "--config.train.lr=1"],
            "error: --config={tmp}/nope.py: no such config file",
        ),
        (["--config={tmp}"], "error: --config={tmp}: not a config file (a folder?)"),
        (
            ["--config={file}", "--config.train.nonexistent=1"],
            "error: --config.train.nonexistent: config has no field 'nonexistent' in train",
        ),
        (
            ["--config={file}", "--config.nonexistent.x=1"],
            "error: --config.nonexistent.x: config has no field 'nonexistent'",
        ),
        (
            ["--config={file}", "--config.train.lr.x=1"],
            "error: --config.train.lr.x: train.lr is a value (float), not a section of the config",
        ),
        (
            ["--config={file}:large"],
            "error: --config={file}:large: cannot load the config: ValueError: unknown variant "
            "'large'",
        ),
        (
            ["--config={tmp}/syntax.py"],
            "error: --config={tmp}/syntax.py: cannot load the config: invalid syntax",
        ),
        (["--config={tmp}/none.py"], "error: --config={tmp}/none.py: get_config() returned None"),
        (
            ["--config={file}", "--config.train.batch_size=abc"],
            "error: flag --config.train.batch_size=abc: invalid literal for int()",
        ),
        ([], "error: --config is required"),
    ],
    ids=[
        "missing",
        "missing-with-override",
        "folder",
        "unknown-field",
        "unknown-section",
        "value-not-section",
        "variant",
        "syntax",
        "none",
        "bad-value",
        "required",
    ],
)
def test_config_errors_are_one_line(config_file, tmp_path, capsys, args, message):
  (tmp_path / "syntax.py").write_text("def get_config(:\n")
  (tmp_path / "none.py").write_text("def get_config():\n  return None\n")
  values, main, _ = _tool()
  argv = ["tool", *(a.format(tmp=tmp_path, file=config_file) for a in args)]
  assert cli.run_in_process(values, main, argv) == 2
  assert _error(capsys).startswith(message.format(tmp=tmp_path, file=config_file))


def test_overrides_parse_by_the_fields_type(config_file, capsys):
  values, main, seen = _tool()
  argv = [
      "tool",
      f"--config={config_file}:small",
      "--config.train.lr=0.25",
      "--noconfig.train.flip",
      "--config.train.sizes=(3, 4)",
  ]
  assert cli.run_in_process(values, main, argv) == 0, capsys.readouterr().err
  train = seen["config"].train
  assert (train.batch_size, train.lr, train.flip, tuple(train.sizes)) == (2, 0.25, False, (3, 4))


def test_split_and_apply_overrides():
  argv = [
      "tool",
      "--workdir=w",
      "--config.train.lr=0.25",
      "--config.train.batch_size",
      "4",
      "--noconfig.train.flip",
      "--out=o",
  ]
  assert cli.gives_flag(argv, "config") is False
  assert cli.gives_flag(["tool", "--config=c.py"], "config")
  rest, overrides = cli.split_overrides(argv)
  assert rest == ["tool", "--workdir=w", "--out=o"]
  assert overrides == [
      "--config.train.lr=0.25",
      "--config.train.batch_size",
      "4",
      "--noconfig.train.flip",
  ]
  config = ConfigDict(dict(train=dict(lr=0.5, batch_size=8, flip=True)))
  applied = cli.apply_overrides(config, overrides)
  assert applied.train.to_dict() == dict(lr=0.25, batch_size=4, flip=False)
  assert config.train.lr == 0.5  # a copy
  assert cli.apply_overrides(config, []) is config
  with pytest.raises(
      InputError,
      match=r"^--config.train.nonexistent: config has no field " r"'nonexistent' in train$",
  ):
    cli.apply_overrides(config, ["--config.train.nonexistent=1"])
  with pytest.raises(InputError, match=r"^flag --config.train.batch_size=x: invalid literal"):
    cli.apply_overrides(config, ["--config.train.batch_size=x"])


def test_load_config_file(config_file):
  assert cli.load_config_file(f"{config_file}:small").train.batch_size == 2
  with pytest.raises(InputError, match="no such config file"):
    cli.load_config_file(f"{config_file.parent}/nope.py")


def test_unwritable_outputs(tmp_path, monkeypatch):
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  assert cli.unwritable(tmp_path / "new" / "deeper" / "out.png") is None
  assert cli.unwritable(tmp_path / "new", folder=True) is None
  assert cli.unwritable(a_file / "out.png") == f"{a_file} is a file, not a folder"
  assert cli.unwritable(a_file / "sub" / "out", folder=True) == f"{a_file} is a file, not a folder"
  assert cli.unwritable(a_file, folder=True) == "it is a file, not a folder"
  assert cli.unwritable(tmp_path) == "it is a folder, not a file"
  assert not list(tmp_path.glob("new*"))  # nothing created
  with pytest.raises(
      InputError, match=rf"^{a_file}/out.png: cannot write --output there: " rf"{a_file} is a file"
  ):
    cli.check_writable(a_file / "out.png", "--output")
  # A read-only folder (chmod does not stop root, so the permission check is simulated).
  monkeypatch.setattr(cli.os, "access", lambda path, mode: False)
  assert cli.unwritable(tmp_path / "out.png") == f"permission denied in {tmp_path}"
  assert cli.unwritable(tmp_path, folder=True) == "permission denied"


def _unraisable(error: BaseException) -> types.SimpleNamespace:
  return types.SimpleNamespace(
      exc_type=type(error),
      exc_value=error,
      exc_traceback=error.__traceback__,
      err_msg=None,
      object=None,
  )


def test_closed_loop_callbacks_are_dropped_and_others_kept(monkeypatch):
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", seen.append)
  cli.ignore_closed_loop_callbacks()
  cli.ignore_closed_loop_callbacks()  # idempotent: one wrapper
  loop = asyncio.new_event_loop()
  loop.close()
  with pytest.raises(RuntimeError) as closed:  # what TensorStore's late callbacks run into
    loop.call_soon_threadsafe(print)
  sys.unraisablehook(_unraisable(closed.value))
  try:
    raise ValueError("something else")
  except ValueError as e:
    other = _unraisable(e)
  sys.unraisablehook(other)
  assert seen == [other]


def test_one_line():
  assert cli.one_line(ValueError("first\nsecond")) == "first"
  assert cli.one_line(ValueError("")) == "ValueError"
  trace = (
      "Error whilst parsing config file:\n\nTraceback (most recent call last):\n  File x\n"
      "KeyError: 'a'"
  )
  assert cli.one_line(ValueError(trace)) == "KeyError: 'a'"
  assert cli.one_line(f"flag --config=c.py: {trace}") == "flag --config=c.py: KeyError: 'a'"
