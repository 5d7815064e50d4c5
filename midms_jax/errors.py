"""Exceptions for bad user input: each message is one line naming the file and the problem."""


class CheckpointError(ValueError):
  """A checkpoint file is unreadable, of the wrong kind, or does not match the model config."""


class InputError(ValueError):
  """An input file (photo, condition map, file list) is missing, unreadable, or unfit for the model."""
