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


def test_missing_trace_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="no \\*.xplane.pb"):
    trace_account.account(str(tmp_path))
