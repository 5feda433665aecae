"""compile_ahead: steps compiled on worker threads are the ones the loop then runs."""

import os
import sys
import threading

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoder_jax.train import compile_ahead


def counting_jit(fn):
  """jit(fn) and a list that grows by one per trace (jit traces once per signature)."""
  traces = []

  def traced(*args):
    traces.append(threading.current_thread().name)
    return fn(*args)

  return jax.jit(traced), traces


def test_matching_calls_run_the_program_compiled_on_the_worker():
  jitted, traces = counting_jit(lambda x, y: x * 2 + y)
  with compile_ahead.AheadOfTime() as ahead:
    program = ahead.program(jitted, jax.ShapeDtypeStruct((3,), jnp.float32),
                            jax.ShapeDtypeStruct((), jnp.float32))
    out = program(jnp.arange(3.0), jnp.float32(1.0))
    np.testing.assert_allclose(out, [1.0, 3.0, 5.0])
    program(jnp.ones(3), jnp.float32(0.0))
  assert len(traces) == 1 and traces[0].startswith("compile_ahead")


def test_other_signatures_fall_back_to_the_jitted_function():
  jitted, traces = counting_jit(lambda x: x.sum())
  with compile_ahead.AheadOfTime() as ahead:
    program = ahead.program(jitted, jax.ShapeDtypeStruct((3,), jnp.float32))
    assert float(program(jnp.ones(4))) == 4.0  # another shape
    assert float(program(jnp.ones(3, jnp.int32))) == 3.0  # another dtype
    assert float(program(jnp.ones(3))) == 3.0  # the compiled one
  assert len(traces) == 3


def test_varying_arguments_are_checked_on_every_call():
  """A train step's batch may change shape (a task's padded lengths): such calls compile
  for themselves, and calls shaped like the ahead one still run it."""
  jitted, traces = counting_jit(lambda state, batch: state + batch.sum())
  with compile_ahead.AheadOfTime() as ahead:
    program = ahead.program(jitted, jax.ShapeDtypeStruct((), jnp.float32),
                            jax.ShapeDtypeStruct((2, 8), jnp.float32), varying_argnums=(1,))
    state = program(jnp.float32(0.0), jnp.ones((2, 8)))
    state = program(state, jnp.ones((2, 4)))  # another length
    state = program(state, jnp.ones((2, 8)))
    state = program(state, jnp.ones((2, 4)))
  assert float(state) == 48.0
  assert len(traces) == 2  # the ahead one and the other length's, once each


def test_a_tracing_error_is_raised_by_the_call():
  def bad(x):
    raise ValueError("shapes do not fit")

  with compile_ahead.AheadOfTime() as ahead:
    program = ahead.program(jax.jit(bad), jax.ShapeDtypeStruct((3,), jnp.float32))
    with pytest.raises(ValueError, match="shapes do not fit"):
      program(jnp.ones(3))


def test_the_workers_trace_inside_the_given_contexts():
  """flax's logical axis rules are per thread: the worker must enter them itself."""
  rules = (("batch", "data"),)
  seen = []

  def fn(x):
    seen.append(tuple(nn.get_logical_axis_rules()))
    return x

  with compile_ahead.AheadOfTime(lambda: (nn.logical_axis_rules(rules),)) as ahead:
    ahead.program(jax.jit(fn), jax.ShapeDtypeStruct((2,), jnp.float32))(jnp.ones(2))
  assert seen == [rules]


def test_shardings_of_the_abstract_arguments_are_compiled_in():
  mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
  spread = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  jitted = jax.jit(lambda x: x * 2, out_shardings=spread)
  with compile_ahead.AheadOfTime() as ahead:
    program = ahead.program(jitted, jax.ShapeDtypeStruct((4,), jnp.float32, sharding=spread))
    out = program(jax.device_put(jnp.arange(4.0), spread))
  np.testing.assert_allclose(out, [0.0, 2.0, 4.0, 6.0])
  assert out.sharding == spread


def test_background_programs_compile_on_a_lowest_priority_thread():
  seen = []

  def fn(x):
    seen.append((threading.current_thread().name,
                 os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
    return x * 3

  with compile_ahead.AheadOfTime() as ahead:
    program = ahead.program(jax.jit(fn), jax.ShapeDtypeStruct((2,), jnp.float32),
                            background=True)
    np.testing.assert_allclose(program(jnp.ones(2)), [3.0, 3.0])
  (thread, nice), = seen
  assert thread.startswith("compile_ahead_background")
  if sys.platform.startswith("linux"):
    assert nice == 19
