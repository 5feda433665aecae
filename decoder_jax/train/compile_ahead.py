"""Compiling the loop's train and eval steps on worker threads while the run sets up.

A run used to compile its parameter init, its train step and its eval step one after
another, each when first called (shakespeare CPU recipe on 2 cores: init 2.1 s, train
step 0.9 s tracing + 3.4 s compiling, eval step 0.9 s). The steps' arguments are known
before the parameters exist (their shapes, dtypes and shardings, as jax.ShapeDtypeStruct),
so the loop hands them to `AheadOfTime`, whose threads trace and compile the steps while
the main thread restores or initialises the parameters. XLA's CPU compiler already keeps
more than one core busy, so on 2 cores this saves ~2.4 s rather than the compiles' sum.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import threading
from typing import Any, Callable, Iterable

import jax


def signature(args) -> tuple:
  """What a compiled program is specific to: the pytree structure and each leaf's shape
  and dtype (concrete arrays and jax.ShapeDtypeStruct alike)."""
  leaves, treedef = jax.tree.flatten(args)
  return treedef, tuple((tuple(leaf.shape), leaf.dtype) for leaf in leaves)


def _lowest_priority() -> None:
  """Nice 19 for the calling thread (Linux: a thread id is a PRIO_PROCESS target)."""
  try:
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
  except (AttributeError, OSError):  # not Linux, or not allowed: keep the priority
    pass


class Program:
  """A jitted function with one signature compiled ahead (a future of jax's Compiled).

  Calls with that signature wait for and run the compiled program; any other call runs
  the jitted function, which compiles for its arguments on first use as usual (e.g. a
  task's batches padded to another length). `varying_argnums`: after the first call only
  these arguments are checked (the signature of a train state's ~140 arrays costs ~80 us
  to build, and it cannot change between steps).
  """

  def __init__(self, jitted, future: concurrent.futures.Future, expected: tuple,
               varying_argnums: tuple[int, ...] | None = None):
    self._jitted, self._future, self._expected = jitted, future, expected
    self._varying = varying_argnums
    self._expected_varying = None  # signature of the varying arguments, after a first call
    self._compiled = None

  def __call__(self, *args):
    if self._expected_varying is not None:
      matches = signature([args[i] for i in self._varying]) == self._expected_varying
    else:
      matches = signature(args) == self._expected
      if matches and self._varying is not None:
        self._expected_varying = signature([args[i] for i in self._varying])
    if not matches:
      return self._jitted(*args)
    if self._compiled is None:
      self._compiled = self._future.result()  # re-raises a tracing or compile error
    return self._compiled(*args)


class AheadOfTime:
  """Worker threads that trace and compile jitted functions for abstract arguments.

  `contexts()` gives the context managers the tracing needs (a mesh, flax's logical axis
  rules); they are entered in the worker, since both are per thread.
  """

  def __init__(self, contexts: Callable[[], Iterable[Any]] = tuple, workers: int = 1):
    self._contexts = contexts
    self._pool = concurrent.futures.ThreadPoolExecutor(workers,
                                                       thread_name_prefix="compile_ahead")
    self._background = concurrent.futures.ThreadPoolExecutor(
        1, thread_name_prefix="compile_ahead_background", initializer=_lowest_priority)

  def program(self, jitted, *abstract_args, varying_argnums: tuple[int, ...] | None = None,
              background: bool = False) -> Program:
    """Starts compiling `jitted` for `abstract_args` (arrays or jax.ShapeDtypeStruct
    with their shardings) and returns the callable that will use the result.
    `background`: on a thread at the lowest CPU priority (Linux), for a program needed
    later (the eval step), whose compile should use only cores nothing else wants."""

    def compile_():
      with contextlib.ExitStack() as stack:
        for context in self._contexts():
          stack.enter_context(context)
        return jitted.lower(*abstract_args).compile()

    pool = self._background if background else self._pool
    return Program(jitted, pool.submit(compile_), signature(abstract_args), varying_argnums)

  def close(self) -> None:
    """Drops compiles not yet started (a compile under way still finishes)."""
    self._pool.shutdown(wait=False, cancel_futures=True)
    self._background.shutdown(wait=False, cancel_futures=True)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
