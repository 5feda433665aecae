"""How every command-line entry point starts and ends.

`cli.run(main)` replaces `absl.app.run(main)`. A user error (bad flag or config field,
missing corpus or checkpoint, an invalid value: `errors.UserError`, or anything raised
while parsing the command line and the config file it names) ends as one line on stderr,

    error: <what is wrong and what to do>

with exit status 2 (`errors.RunFailed`: 1) and no traceback. Other exceptions are bugs
and keep their traceback. `--debug` or DECODER_JAX_DEBUG=1 shows the traceback of user
errors too.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

from decoder_jax import errors

DEBUG_ENV = "DECODER_JAX_DEBUG"
USAGE_STATUS = 2

_DEBUG = flags.DEFINE_bool("debug", False, f"show the traceback of an error (or set {DEBUG_ENV}=1)")


def _debugging(argv) -> bool:
  if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
    return True
  if flags.FLAGS.is_parsed():
    return _DEBUG.value
  return any(a in ("--debug", "-debug", "--debug=true", "--debug=True", "--debug=1")
             for a in argv)  # parsing failed before --debug was read


def one_line(message: str) -> str:
  """The message with its line breaks and runs of spaces folded into single spaces."""
  return " ".join(str(message).split())


def fail(message: str, status: int = USAGE_STATUS):
  """Prints `error: message` on one line and exits with `status`."""
  sys.stderr.write(f"error: {one_line(message)}\n")
  sys.stderr.flush()
  sys.exit(status)


def _parse_flags(argv):
  """absl's parse, with a bad command line (unknown flag, bad value, a config file that
  does not load, an unknown config field) reported as one line."""
  try:
    remaining = flags.FLAGS(argv)
    for name in flags.FLAGS:
      _check_config_loaded(name, flags.FLAGS[name].value)
    return remaining
  except Exception as e:  # pylint: disable=broad-except  # argv and its config are the user's
    if _debugging(argv):
      raise
    fail(_flag_message(e))


def _check_config_loaded(name: str, value) -> None:
  # ml_collections keeps a config file that failed to load as a stand-in that raises on
  # first use (inside main, with a traceback); ask it now.
  if type(value).__name__ == "_ErrorConfig":
    raise ValueError(f"--{name}: {object.__getattribute__(value, '_error')}")


def _flag_message(e: Exception) -> str:
  message = str(e)
  if isinstance(e, (KeyError, AttributeError)):  # ml_collections: an override of a field
    # that does not exist; its message is the repr of "'name'\nDid you mean ...?".
    message = message.strip("'\"").replace("\\n", " ").replace("\\'", "'")
    return f"unknown config field {message}"
  return message or type(e).__name__


def run(main, positional: int = 0) -> None:
  """Parses flags and runs `main(argv)`, ending a user error in one `error:` line.

  `main` takes up to `positional` arguments after the flags; more are a usage error.
  """

  def guarded(argv):
    if len(argv) - 1 > positional:
      fail(f"unexpected arguments: {argv[1 + positional:]}")
    try:
      return main(argv)
    except (errors.UserError, app.UsageError) as e:
      if _debugging(argv):
        raise
      fail(str(e), getattr(e, "exit_status", USAGE_STATUS))

  app.run(guarded, flags_parser=_parse_flags)
