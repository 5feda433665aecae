"""Progress of long work (loading weights, preparing a corpus, evaluating, decoding).

On a terminal, a tqdm bar on stderr with the count, rate and ETA; otherwise (a log file,
CI, a pipe) nothing while the work runs and one summary line when it ends:

    <what>: 1000 prompts in 41.2 s

DECODER_JAX_PROGRESS=bar or =line chooses one whatever stderr is; =off prints nothing.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

import tqdm

T = TypeVar("T")
MODE_ENV = "DECODER_JAX_PROGRESS"


def _mode() -> str:
  chosen = os.environ.get(MODE_ENV, "").lower()
  if chosen in ("bar", "line", "off"):
    return chosen
  return "bar" if sys.stderr.isatty() else "line"


class Progress:
  """Counts units of work: `update(n)` as they finish, `close()` (or the end of a `with`
  block) for the summary. An exception inside the block prints no summary."""

  def __init__(self, what: str, total: int | None = None, unit: str = "it"):
    self.what, self.total, self.unit = what, total, unit
    self.count = 0
    self._start = time.perf_counter()
    self._mode = _mode()
    self._bar = (tqdm.tqdm(total=total, desc=what, unit=f" {unit}", file=sys.stderr,
                           dynamic_ncols=True, mininterval=0.5)
                 if self._mode == "bar" else None)
    self._closed = False

  def update(self, n: int = 1) -> None:
    self.count += n
    if self._bar is not None:
      self._bar.update(n)

  def close(self, summary: bool = True) -> None:
    if self._closed:
      return
    self._closed = True
    if self._bar is not None:
      self._bar.close()
    elif self._mode == "line" and summary:
      seconds = time.perf_counter() - self._start
      sys.stderr.write(f"{self.what}: {self.count} {self.unit} in {seconds:.1f} s\n")
      sys.stderr.flush()

  def __enter__(self) -> "Progress":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    self.close(summary=exc_type is None)


@contextlib.contextmanager
def all_at_once(what: str, count: int, unit: str = "it"):
  """Work done by one call that reports nothing (an orbax restore): the bar shows the
  time, and the count moves to `count` when the block ends."""
  with Progress(what, count, unit) as shown:
    yield
    shown.update(count)


def track(items: Iterable[T], what: str, total: int | None = None, unit: str = "it",
          weight=None) -> Iterator[T]:
  """Yields `items`, counting each (or `weight(item)` units of it) as done once the
  caller asks for the next one."""
  if total is None and hasattr(items, "__len__"):
    total = len(items)
  with Progress(what, total, unit) as progress:
    for item in items:
      yield item
      progress.update(1 if weight is None else weight(item))
