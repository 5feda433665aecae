"""Where the time went in a jax.profiler trace: device time by kind of work, and the top ops.

  python -m decoder_jax.trace_account WORKDIR/profile [--steps N] [--top 12]

Reads the newest `*.xplane.pb` under the directory (what `train.profile_steps`,
`jax.profiler.trace` or `benchmarks/train_speed.py --trace_dir` write) with JAX's own
reader (`jax.profiler.ProfileData`), so no TensorBoard is needed.

- GPU traces: every kernel on the `/device:GPU:N` planes' stream lines, sorted into matmul
  (cuBLAS/cuBLASLt/CUTLASS/Triton GEMMs), attention (cuDNN/flash kernels), collective
  (NCCL), memory copies/sets and the remaining XLA fusions, by kernel name and the `hlo_op`
  XLA recorded for it. "idle" is the part of the traced span (first kernel start to last
  kernel end, per GPU) in which no kernel ran: host-side launch gaps, synchronisation.
- CPU traces: every event that carries an `hlo_op` on the host's XLA threads, at its own
  time (a while loop's or call's children are subtracted from it). Several threads run at
  once, so the shares are of summed thread time, not of wall time.

Both give milliseconds per step when --steps says how many steps the trace holds.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import os
import re

from absl import flags

from decoder_jax import cli
from decoder_jax.errors import ConfigError, NotFound

# Checked in this order; the first category whose pattern matches the kernel name or its
# hlo_op wins. Attention before matmul: cuDNN's flash kernels have "gemm"-like names too.
_GPU_CATEGORIES = (
    ("collective", re.compile(r"nccl|all-reduce|all_reduce|allreduce|all-gather|all_gather|"
                              r"reduce-scatter|reduce_scatter|all-to-all|collective", re.I)),
    ("attention", re.compile(r"fmha|flash|sdpa|cudnn|attention", re.I)),
    ("matmul", re.compile(r"gemm|xmma|nvjet|cutlass|cublas|wgmma|hgmma|\bdot\b|dot[._]|matmul",
                          re.I)),
    ("copy/memset", re.compile(r"memcpy|memset|^copy|copy[._]\d|transpose|dynamic-update-slice",
                               re.I)),
)
_CPU_CATEGORIES = (
    ("collective", re.compile(r"all-reduce|psum|all-gather|reduce-scatter|all-to-all|"
                              r"collective-permute", re.I)),
    # XLA CPU's matmuls: plain dots, and dots fused by YNNPACK / oneDNN.
    ("matmul", re.compile(r"\bdot|ynn_fusion|onednn|gemm|matmul|convolution", re.I)),
    ("copy/transpose", re.compile(r"copy|transpose|dynamic-update-slice|concatenate", re.I)),
    ("control", re.compile(r"^(while|conditional|call)\b", re.I)),
)
_DERIVED_LINES = {"XLA Ops", "XLA Modules", "Steps", "Framework Ops", "Framework Name Scope",
                  "Source code", "XLA TraceMe", "TensorFlow Ops", "TensorFlow Name Scope"}
OTHER = "fusion/elementwise"
IDLE = "idle (no kernel running)"


@dataclasses.dataclass
class Account:
  """Device time of one trace. Times in nanoseconds, summed over devices (or threads)."""
  path: str
  kind: str  # "gpu" or "cpu"
  devices: int  # GPUs, or host threads that ran XLA ops
  by_category: dict[str, float]
  by_op: dict[str, float]  # "category: op name" -> ns
  op_counts: dict[str, int]
  span_ns: float  # GPU: summed per-device spans; CPU: wall span of all hlo events
  modules: dict[str, float]  # hlo_module -> ns


def categorize(name: str, hlo_op: str, categories=_GPU_CATEGORIES) -> str:
  for category, pattern in categories:
    if pattern.search(name) or (hlo_op and pattern.search(hlo_op)):
      return category
  return OTHER


def newest_xplane(path: str) -> str:
  """The newest .xplane.pb at or under `path` (a file, or a directory searched recursively)."""
  if os.path.isfile(path):
    return path
  if not os.path.isdir(path):
    raise NotFound(f"trace {path} does not exist")
  found = glob.glob(os.path.join(path, "**", "*.xplane.pb"), recursive=True)
  if not found:
    raise NotFound(f"no *.xplane.pb under {path!r}: pass the directory given to "
                   "jax.profiler (e.g. WORKDIR/profile) after the trace was stopped")
  return max(found, key=os.path.getmtime)


def _stats(event) -> dict:
  try:
    return dict(event.stats)
  except Exception:  # a stat of a type the reader cannot convert
    return {}


def _exclusive(events):
  """(event, stats, own ns) for events on one timeline, minus time of events nested inside."""
  events = sorted(events, key=lambda e: (e[0].start_ns, -e[0].duration_ns))
  own = [e[0].duration_ns for e in events]
  ends = [e[0].start_ns + e[0].duration_ns for e in events]
  stack = []  # indices of the events that enclose the current one
  for i, (event, _) in enumerate(events):
    while stack and ends[stack[-1]] <= event.start_ns:
      stack.pop()
    if stack:
      own[stack[-1]] -= event.duration_ns
    stack.append(i)
  return [(event, stats, max(t, 0.0)) for (event, stats), t in zip(events, own)]


def _union_ns(intervals) -> float:
  total, end = 0.0, None
  for start, stop in sorted(intervals):
    if end is None or start > end:
      total += stop - start
      end = stop
    elif stop > end:
      total += stop - end
      end = stop
  return total


def account(path: str) -> Account:
  from jax.profiler import ProfileData  # jax's XSpace reader; no TensorBoard needed

  path = newest_xplane(path)
  data = ProfileData.from_file(path)
  by_category = collections.Counter()
  by_op = collections.Counter()
  counts = collections.Counter()
  modules = collections.Counter()
  gpu_planes = [p for p in data.planes if re.match(r"/device:GPU:\d+", p.name)]
  if gpu_planes:
    span = 0.0
    for plane in gpu_planes:
      intervals = []
      # Kernels run on the stream lines; derived lines ("XLA Ops", "Steps"), where a
      # trace has them, repeat those kernels. A plane without stream lines counts all.
      lines = [l for l in plane.lines if l.name.lower().startswith("stream")] or [
          l for l in plane.lines if l.name not in _DERIVED_LINES]
      for line in lines:
        for event in line.events:
          stats = _stats(event)
          op = str(stats.get("hlo_op", ""))
          category = categorize(event.name, op)
          by_category[category] += event.duration_ns
          key = f"{category}: {op or event.name}"
          by_op[key] += event.duration_ns
          counts[key] += 1
          modules[str(stats.get("hlo_module", "?"))] += event.duration_ns
          intervals.append((event.start_ns, event.start_ns + event.duration_ns))
      if intervals:
        plane_span = max(b for _, b in intervals) - min(a for a, _ in intervals)
        span += plane_span
        by_category[IDLE] += plane_span - _union_ns(intervals)
    if not by_op:
      raise ConfigError(f"{path}: GPU planes but no kernels on them; was any jitted program "
                        "run while the trace was on?")
    return Account(path, "gpu", len(gpu_planes), dict(by_category), dict(by_op), dict(counts),
                   span, dict(modules))

  starts, ends, threads = [], [], 0
  for plane in data.planes:
    if not plane.name.startswith("/host:CPU"):
      continue
    for line in plane.lines:
      events = [(e, s) for e in line.events for s in [_stats(e)] if "hlo_op" in s]
      if not events:
        continue
      threads += 1
      for event, stats, own in _exclusive(events):
        op = str(stats["hlo_op"])
        category = categorize(op, "", _CPU_CATEGORIES)
        by_category[category] += own
        key = f"{category}: {op}"
        by_op[key] += own
        counts[key] += 1
        modules[str(stats.get("hlo_module", "?"))] += own
        starts.append(event.start_ns)
        ends.append(event.start_ns + event.duration_ns)
  if not starts:
    raise ConfigError(f"{path}: no GPU kernels and no host events with an hlo_op; was any "
                      "jitted program run while the trace was on?")
  return Account(path, "cpu", threads, dict(by_category), dict(by_op), dict(counts),
                 max(ends) - min(starts), dict(modules))


def split_text(ms_per_step: dict[str, float]) -> str:
  """One line for a {kind of work: ms per step} split, in its order: "matmul 1.20 ms (60%), ..."."""
  total = sum(ms_per_step.values()) or 1.0
  return ", ".join(f"{k} {v:.2f} ms ({v / total:.0%})" for k, v in ms_per_step.items())


def format_table(acc: Account, steps: int = 0, top: int = 12) -> str:
  """A markdown table of the categories (largest first), then the `top` ops."""
  per = f"ms/step (over {steps})" if steps else "ms (whole trace)"
  scale = 1e6 * (steps or 1)
  total = sum(acc.by_category.values())
  where = (f"{acc.devices} GPU(s); shares of the traced span" if acc.kind == "gpu" else
           f"{acc.devices} host thread(s) running XLA ops; shares of their summed time")
  lines = [f"Trace {acc.path} ({where})", "", f"| work | {per} | share |", "|---|---:|---:|"]
  for name, ns in sorted(acc.by_category.items(), key=lambda kv: -kv[1]):
    lines.append(f"| {name} | {ns / scale:.3f} | {100 * ns / total:.1f}% |")
  lines.append(f"| total | {total / scale:.3f} | 100% |")
  lines += ["", f"Top {top} ops:", "", f"| op | calls | {per} | share |", "|---|---:|---:|---:|"]
  for key, ns in sorted(acc.by_op.items(), key=lambda kv: -kv[1])[:top]:
    lines.append(f"| {key} | {acc.op_counts[key]} | {ns / scale:.3f} | {100 * ns / total:.1f}% |")
  return "\n".join(lines)


def main(argv):
  if len(argv) != 2:
    raise ConfigError("give one trace: an .xplane.pb file or a directory holding one "
                      "(python -m decoder_jax.trace_account WORKDIR/profile --steps N)")
  steps, top = flags.FLAGS.steps, flags.FLAGS.top
  if steps < 0 or top < 1:
    raise ConfigError(f"--steps must be >= 0 and --top >= 1, got {steps} and {top}")
  print(format_table(account(argv[1]), steps, top))


if __name__ == "__main__":
  # Defined here, not at import: benchmarks and tests import this module as a library.
  flags.DEFINE_integer("steps", 0, "steps in the trace: ms per step")
  flags.DEFINE_integer("top", 12, "ops listed")
  cli.run(main, positional=1)
