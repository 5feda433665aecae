"""decoder_jax.trace_account: device time by kind of work from a jax.profiler trace."""

import jax
import jax.numpy as jnp
import pytest

from decoder_jax import trace_account


@pytest.mark.parametrize("kernel, hlo_op, expected", [
    # Kernel names as cuBLAS, cuBLASLt, CUTLASS, cuDNN, NCCL and XLA's emitters give them.
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "custom-call.12", "matmul"),
    ("nvjet_tst_192x192_64x3_2x1_v_bz_coopB_TNN", "cublas-gemm.3", "matmul"),
    ("gemm_fusion_dot_12_impl", "gemm_fusion_dot.12", "matmul"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", "custom-call.4",
     "attention"),
    ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", "all-reduce.1", "collective"),
    ("loop_add_fusion_3", "loop_add_fusion.3", trace_account.OTHER),
    ("input_reduce_fusion", "input_reduce_fusion", trace_account.OTHER),
    ("MemcpyD2D", "", "copy/memset"),
])
def test_gpu_kernels_are_sorted_by_name_and_hlo_op(kernel, hlo_op, expected):
  assert trace_account.categorize(kernel, hlo_op) == expected


def test_cpu_trace_account(tmp_path):
  @jax.jit
  def program(x, w):  # x [64, 256], w [256, 256]: three matmuls in a loop, then a reduce
    def body(i, x):
      return jnp.tanh(x @ w)
    return jax.lax.fori_loop(0, 3, body, x).sum()

  x, w = jnp.ones((64, 256)), jnp.full((256, 256), 0.01)
  step = jax.jit(jax.grad(program, argnums=1))
  step(x, w).block_until_ready()  # compiled outside the trace
  with jax.profiler.trace(str(tmp_path)):
    for _ in range(4):
      step(x, w).block_until_ready()

  acc = trace_account.account(str(tmp_path))
  assert acc.kind == "cpu" and acc.devices >= 1
  assert acc.by_category.get("matmul", 0) > 0, acc.by_category
  # Own times: the ops' times add up to the categories', and a loop's children are not
  # counted twice, so no thread holds more than the traced span.
  assert sum(acc.by_op.values()) == pytest.approx(sum(acc.by_category.values()))
  assert sum(acc.by_category.values()) <= acc.devices * acc.span_ns
  assert set(acc.modules) == {"jit_program"}, acc.modules
  table = trace_account.format_table(acc, steps=4, top=3)
  assert "| matmul |" in table and "ms/step (over 4)" in table


def test_exclusive_time_subtracts_nested_events():
  class Event:
    def __init__(self, start, duration):
      self.start_ns, self.duration_ns = start, duration

  outer, inner_a, inner_b, after = Event(0, 100), Event(10, 30), Event(50, 20), Event(120, 5)
  own = {id(e): t for e, _, t in trace_account._exclusive(
      [(outer, {}), (inner_a, {}), (inner_b, {}), (after, {})])}
  assert own[id(outer)] == 50 and own[id(inner_a)] == 30 and own[id(after)] == 5


# --- a GPU trace, written as an XSpace protobuf by hand (no GPU here) ------------------
# Wire format of tsl's xplane.proto: XSpace.planes=1; XPlane id=1 name=2 lines=3
# event_metadata=4 stat_metadata=5 (maps: key=1 value=2); XLine id=1 name=2 timestamp_ns=3
# events=4; XEvent metadata_id=1 offset_ps=2 duration_ps=3 stats=4; XStat metadata_id=1
# str_value=5; X*Metadata id=1 name=2.


def _varint(n):
  out = bytearray()
  while True:
    low, n = n & 0x7F, n >> 7
    out.append(low | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _int(num, n):
  return _varint(num << 3) + _varint(n)


def _bytes(num, payload):
  payload = payload.encode() if isinstance(payload, str) else payload
  return _varint((num << 3) | 2) + _varint(len(payload)) + payload


def _gpu_xspace(kernels, derived_copy=True):
  """kernels: [(name, hlo_op, start_us, duration_us)] on one stream of /device:GPU:0."""
  names = {name: i + 1 for i, name in enumerate(dict.fromkeys(k[0] for k in kernels))}
  events = b"".join(_bytes(4, _int(1, names[name]) + _int(2, start * 10**6) +
                           _int(3, duration * 10**6) + _bytes(4, _int(1, 1) + _bytes(5, op)))
                    for name, op, start, duration in kernels)
  lines = [_int(1, 7) + _bytes(2, "Stream #7(Compute)") + _int(3, 0) + events]
  if derived_copy:  # the same kernels again, as a derived line must not count twice
    lines.append(_int(1, 8) + _bytes(2, "XLA Ops") + _int(3, 0) + events)
  plane = _int(1, 1) + _bytes(2, "/device:GPU:0") + b"".join(_bytes(3, l) for l in lines)
  plane += b"".join(_bytes(4, _int(1, i) + _bytes(2, _int(1, i) + _bytes(2, name)))
                    for name, i in names.items())
  plane += _bytes(5, _int(1, 1) + _bytes(2, _int(1, 1) + _bytes(2, "hlo_op")))
  host = _int(1, 2) + _bytes(2, "/host:CPU")
  return _bytes(1, plane) + _bytes(1, host)


def test_gpu_trace_account(tmp_path):
  kernels = [  # one step: 20 us traced, 16 us of kernels, 4 us idle
      ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n", "custom-call.1", 0, 6),
      ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma", "custom-call.2", 6, 4),
      ("loop_add_fusion", "loop_add_fusion", 12, 2),  # 2 us gap before it
      ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", "all-reduce.1", 16, 3),  # 2 us gap
      ("MemcpyD2D", "", 19, 1),
  ]
  (tmp_path / "plugins" / "profile" / "run").mkdir(parents=True)
  (tmp_path / "plugins" / "profile" / "run" / "h.xplane.pb").write_bytes(_gpu_xspace(kernels))
  acc = trace_account.account(str(tmp_path))
  assert acc.kind == "gpu" and acc.devices == 1
  ms = {k: v / 1e6 for k, v in acc.by_category.items()}
  assert ms == pytest.approx({"matmul": 0.006, "attention": 0.004, trace_account.OTHER: 0.002,
                              "collective": 0.003, "copy/memset": 0.001,
                              trace_account.IDLE: 0.004})
  assert acc.span_ns == pytest.approx(20_000)
  assert acc.op_counts["matmul: custom-call.1"] == 1  # the "XLA Ops" copy is not counted
  assert "| idle (no kernel running) | 0.002 | 20.0% |" in trace_account.format_table(acc, 2)


def test_missing_trace_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="no \\*.xplane.pb"):
    trace_account.account(str(tmp_path))
