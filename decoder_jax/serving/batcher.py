"""The request queue and the one worker thread that owns the model.

Requests wait in a bounded queue (full: `QueueFull`, HTTP 429). The worker takes the
oldest, waits up to `wait_s` for more with the same key (the decode settings), and runs
one decode call over the rows of up to `max_batch` rows' worth of them, oldest first;
requests with other keys keep their place for a later call. A decode that raises fails
the requests of its call only: the worker goes on with the next.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Hashable

log = logging.getLogger(__name__)


class QueueFull(Exception):
  """max_queue requests are waiting already."""


@dataclasses.dataclass(eq=False)
class _Pending:
  key: Hashable
  rows: list
  seed: int
  on_token: Callable[[int, int], None] | None
  future: concurrent.futures.Future


class Batcher:
  """`decode(key, rows, seeds, on_token)` -> one result per row, called on the worker
  thread; `on_token(row, token_id)` (None when no request listens) as tokens come."""

  def __init__(self, decode: Callable, *, max_batch: int, max_queue: int, wait_s: float):
    self._decode = decode
    self.max_batch, self.max_queue, self.wait_s = max_batch, max_queue, wait_s
    self._waiting: list[_Pending] = []
    self._cond = threading.Condition()
    self._paused = self._stopping = False
    self._thread: threading.Thread | None = None
    self.decode_calls = self.failed_calls = self.requests_done = 0
    self.batch_sizes = collections.deque(maxlen=100)  # requests per call, latest last

  def submit(self, key: Hashable, rows: list, seed: int,
             on_token: Callable[[int, int], None] | None = None) -> concurrent.futures.Future:
    """Queues `rows` (at most max_batch); the future gets their results, in order.
    `on_token(i, token_id)`, for row i of these, is called on the worker thread."""
    if not 1 <= len(rows) <= self.max_batch:
      raise ValueError(f"a request holds 1 to max_batch={self.max_batch} rows, "
                       f"got {len(rows)}")
    pending = _Pending(key, list(rows), seed, on_token, concurrent.futures.Future())
    with self._cond:
      if self._stopping:
        raise RuntimeError("the server is shutting down")
      if len(self._waiting) >= self.max_queue:
        raise QueueFull(f"{len(self._waiting)} requests are waiting already "
                        f"(--max_queue={self.max_queue}); retry later")
      self._waiting.append(pending)
      self._cond.notify_all()
    return pending.future

  def stats(self) -> dict:
    with self._cond:
      return {"queued": len(self._waiting), "decode_calls": self.decode_calls,
              "failed_calls": self.failed_calls, "requests_done": self.requests_done,
              "batch_sizes": list(self.batch_sizes), "max_batch": self.max_batch,
              "max_queue": self.max_queue}

  def start(self) -> None:
    if self._thread is None:
      self._stopping = False
      self._thread = threading.Thread(target=self._run, name="decode-worker", daemon=True)
      self._thread.start()

  def stop(self, timeout: float | None = None) -> None:
    """Ends the worker after its current call; requests still waiting fail."""
    with self._cond:
      self._stopping = True
      left, self._waiting = self._waiting, []
      self._cond.notify_all()
    for pending in left:
      pending.future.set_exception(RuntimeError("the server shut down before decoding"))
    if self._thread is not None:
      self._thread.join(timeout)
      self._thread = None

  @contextlib.contextmanager
  def paused(self):
    """Holds the worker before its next call while the block runs: requests queue up
    (a test fills the queue, or lines up a batch, this way)."""
    with self._cond:
      self._paused = True
    try:
      yield self
    finally:
      with self._cond:
        self._paused = False
        self._cond.notify_all()

  def wait_queued(self, count: int, timeout: float = 30.0) -> None:
    """Blocks until `count` requests are waiting (TimeoutError after `timeout` s)."""
    deadline = time.monotonic() + timeout
    with self._cond:
      while len(self._waiting) < count:
        left = deadline - time.monotonic()
        if left <= 0:
          raise TimeoutError(f"{len(self._waiting)} of {count} requests queued")
        self._cond.wait(left)

  def _run(self) -> None:
    while True:
      with self._cond:
        while not self._stopping and (self._paused or not self._waiting):
          self._cond.wait()
        if self._stopping:
          return
        key = self._waiting[0].key
        deadline = time.monotonic() + self.wait_s
        while not self._stopping and self._rows(key) < self.max_batch:
          left = deadline - time.monotonic()
          if left <= 0:
            break
          self._cond.wait(left)
        batch = self._take(key)
      if batch:
        self._call(key, batch)

  def _rows(self, key) -> int:
    return sum(len(p.rows) for p in self._waiting if p.key == key)

  def _take(self, key) -> list[_Pending]:
    """The oldest requests with `key` that fit in one call, out of the queue."""
    chosen, rows = [], 0
    for pending in self._waiting:
      if pending.key == key and rows + len(pending.rows) <= self.max_batch:
        chosen.append(pending)
        rows += len(pending.rows)
    self._waiting = [p for p in self._waiting if p not in chosen]
    self._cond.notify_all()  # wait_queued, and room in the queue
    # A future cancelled by now (its client went away) is dropped; the rest can no
    # longer be cancelled.
    return [p for p in chosen if p.future.set_running_or_notify_cancel()]

  def _call(self, key, batch: list[_Pending]) -> None:
    owners = [(pending, i) for pending in batch for i in range(len(pending.rows))]

    def on_token(row: int, token_id: int) -> None:
      pending, i = owners[row]
      if pending.on_token is not None:
        try:
          pending.on_token(i, token_id)
        except Exception:  # pylint: disable=broad-except  # one listener must not end a call
          log.exception("a stream listener failed")

    listening = any(p.on_token is not None for p in batch)
    with self._cond:
      self.decode_calls += 1
      self.batch_sizes.append(len(batch))
    try:
      results = self._decode(key, [r for p in batch for r in p.rows],
                             [p.seed for p, _ in owners], on_token if listening else None)
      if len(results) != len(owners):
        raise RuntimeError(f"decode returned {len(results)} results for {len(owners)} rows")
    except Exception as e:  # pylint: disable=broad-except  # answered to its requests
      log.exception("a decode call over %d requests failed", len(batch))
      with self._cond:
        self.failed_calls += 1
      for pending in batch:
        pending.future.set_exception(e)
      return
    start = 0
    with self._cond:
      self.requests_done += len(batch)
    for pending in batch:
      pending.future.set_result(results[start:start + len(pending.rows)])
      start += len(pending.rows)
