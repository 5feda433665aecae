"""Errors that are the user's to fix, as opposed to bugs.

The command-line entry points (`decoder_jax.cli`) print a `UserError` as one line,
`error: <message>`, and exit with status 2 (`RunFailed`: 1); any other exception is a
programming error and keeps its traceback. Each class also derives from the builtin a
library caller would expect (`except ValueError` still catches a `ConfigError`).
"""


class UserError(Exception):
  """Something the user gave (a config field, a flag, a file, a checkpoint) is wrong.

  The message says what is wrong and what to do, in one line.
  """

  exit_status = 2


class ConfigError(UserError, ValueError):
  """A value the user chose is invalid: a config field, a flag, the contents of a file."""


class NotFound(UserError, FileNotFoundError):
  """A file, folder, corpus or checkpoint the user named does not exist (or is not one)."""


class RunFailed(UserError, RuntimeError):
  """A run that started from good input could not finish (the training data ran out, a
  download failed). Exit status 1."""

  exit_status = 1
