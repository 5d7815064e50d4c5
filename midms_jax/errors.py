"""Exceptions for bad user input: each message is one line naming the file and the problem."""


class CheckpointError(ValueError):
  """A checkpoint file is unreadable, of the wrong kind, or does not match the model config."""
