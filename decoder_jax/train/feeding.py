"""Host batches to device arrays for the compiled train calls.

A compiled call runs `n` steps (train.steps_per_call); its n batches are stacked
[n, batch, ...] and placed one call ahead of the call that reads them (DevicePrefetch).
"""

from __future__ import annotations

import itertools

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from decoder_jax import sharding


def call_sizes(first_step: int, end_step: int, per_call: int):
  """How many steps each compiled call runs, from `first_step` to `end_step`: `per_call`
  from each multiple of it, single steps where fewer remain or before the first one."""
  step = first_step
  while step < end_step:
    size = per_call if step % per_call == 0 and step + per_call <= end_step else 1
    yield size
    step += size


class DevicePrefetch:
  """The training batches, handed to the device (`to_device`) one call ahead of the call
  that reads them, so their host-to-device copy overlaps the steps in flight.

  Each item is (n, batches): the n batches of one compiled call (`sizes` gives each call's
  n, default 1), as `to_device(list of n host batches)` places them. get_state() is the
  data state of the first batch not yet returned (the iterator itself has read one call
  further), which is what a checkpoint after the last dispatched call must resume from.
  """

  def __init__(self, iterator, to_device, sizes=None):
    self._iterator, self._to_device = iterator, to_device
    self._sizes = iter(sizes) if sizes is not None else itertools.repeat(1)
    self._ahead = None  # (data state before the call's batches, n, batches on the device)

  def _read(self):
    size = next(self._sizes)  # StopIteration here: no calls left
    state = self._iterator.get_state()
    host = []
    try:
      while len(host) < size:
        host.append(next(self._iterator))
    except StopIteration:
      pass
    if not host:
      raise StopIteration  # a finite source ended at a call's boundary
    # A finite source that ends inside a call gives a shorter last call, not a dropped one.
    return state, len(host), self._to_device(host)

  def __iter__(self):
    return self

  def __next__(self):
    if self._ahead is None:
      self._ahead = self._read()  # StopIteration here: nothing left
    _, size, batches = self._ahead
    try:
      self._ahead = self._read()
    except StopIteration:  # no calls left, or a finite source ended
      self._ahead = None
    return size, batches

  def get_state(self):
    return self._ahead[0] if self._ahead is not None else self._iterator.get_state()


def global_batch(local_batch: dict, batch_sharding) -> dict:
  return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v))
          for k, v in local_batch.items()}


def peek_abstract_batch(iterator, batch_sharding):
  """Shapes, dtypes and shardings of the iterator's next (global) batch; the iterator is
  set back to where it was."""
  position = iterator.get_state()
  batch = next(iterator)
  iterator.set_state(position)
  return sharding.abstract_like(global_batch(batch, batch_sharding))


def stacked_abstract(one_batch, size, stacked_sharding):
  """The input of a `size`-step call: `one_batch` itself, or `size` of it stacked."""
  if size == 1:
    return one_batch
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct((size, *x.shape), x.dtype,
                                                     sharding=stacked_sharding), one_batch)


class BatchPlacement:
  """Where batches go on `mesh`: one batch [batch, ...] split over the data-parallel
  axes, a call's stacked batches [steps, batch, ...] likewise on their second axis."""

  def __init__(self, mesh):
    self.one = sharding.batch_sharding(mesh)
    self.stacked = NamedSharding(mesh, P(None, *self.one.spec))

  def to_device(self, host_batches: list[dict]) -> dict:
    """The global arrays of one call's host batches (stacked when there are several)."""
    if len(host_batches) == 1:
      return global_batch(host_batches[0], self.one)
    return global_batch({k: np.stack([np.asarray(b[k]) for b in host_batches])
                         for k in host_batches[0]}, self.stacked)

  def abstract_call(self, one_batch, size: int):
    return stacked_abstract(one_batch, size, self.stacked)
