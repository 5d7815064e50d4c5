"""Exceptions for bad user input: each message is one line naming the file and the problem."""


class CheckpointError(ValueError):
  """A checkpoint file is unreadable, of the wrong kind, or does not match the model config."""


class InputError(ValueError):
  """An input file (photo, condition map, file list) is missing, unreadable, or unfit for the
  model."""


def first_line(error: BaseException) -> str:
  """The first line of an exception's message (its type name when empty): for the one-line errors
  above, when a library (torch, orbax, PIL, numpy) raises with a multi-line message."""
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__
