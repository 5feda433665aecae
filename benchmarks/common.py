"""What the benchmarks share: machine facts, contention, timing, subprocesses, tables, and both
sides of a training step. Heavy imports stay in functions: the timed torch reference imports
this module too."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib.metadata
import json
import os
import pathlib
import platform
import shlex
import signal
import statistics
import subprocess
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
PLUGINS = ("jax-cuda12-plugin", "jax-cuda13-plugin")
BF16_WARN = 0.05  # step-0 loss agreement expected across frameworks in bfloat16


def version(dist: str) -> str:
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return "not installed"


def cores() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def proc_field(path: str, field: str):
  """The value of the first "field: value" line of a /proc file, or None."""
  try:
    with open(path) as f:
      return next((line.split(":", 1)[1].strip() for line in f if line.startswith(field)), None)
  except OSError:
    return None


def cpu_name() -> str:
  return proc_field("/proc/cpuinfo", "model name") or platform.processor() or platform.machine()


def data_dir() -> str:
  return os.environ.get("DECODER_JAX_DATA") or str(REPO.parent / "shared" / "data")


def env_facts(dists=("jax", "jaxlib", "flax", "optax", "torch", "transformers")) -> dict:
  env = {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
         "python": platform.python_version(), "platform": platform.platform(),
         "cpu": cpu_name(), "cores": cores(), **{d: version(d) for d in dists}}
  env.update({p: version(p) for p in PLUGINS if version(p) != "not installed"})
  return dict(env, loadavg_start=os.getloadavg())


def command_line(script: str, argv) -> str:
  return "python " + shlex.join([f"benchmarks/{script}", *argv])


def dump(path, data, say=True) -> None:
  """JSON to `path`, atomically."""
  with open(path + ".tmp", "w") as f:
    json.dump(data, f, indent=1, default=str)
  os.replace(path + ".tmp", path)
  if say:
    print(f"wrote {path}")


def busy_cpu_seconds():
  """Busy CPU seconds of the whole machine (all cores), or None off Linux."""
  try:
    with open("/proc/stat") as f:
      fields = [int(x) for x in f.readline().split()[1:]]
  except OSError:
    return None
  idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
  return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def others_busy(busy0, busy1, own, wall):
  """Share of all cores that other processes kept busy (None where unknown)."""
  if busy0 is None or busy1 is None or wall <= 0:
    return None
  return max(0.0, busy1 - busy0 - own) / (wall * cores())


@contextlib.contextmanager
def contention():
  """{"others"}: how busy other processes kept the cores over the block (a child's CPU
  counts as our own once it has been waited for)."""
  own = lambda: sum(os.times()[:4])  # noqa: E731  # user, system, children's user and system
  out, busy0, own0, t0 = {"others": None}, busy_cpu_seconds(), own(), time.perf_counter()
  yield out
  out["others"] = others_busy(busy0, busy_cpu_seconds(), own() - own0, time.perf_counter() - t0)


@contextlib.contextmanager
def host_peak():
  """{"growth", "how"}: growth of this process's peak RSS (VmHWM) over the block: the
  block's own peak where /proc/self/clear_refs resets VmHWM, else its lifetime peak's."""
  def kib(field):
    value = proc_field("/proc/self/status", field + ":")
    return int(value.split()[0]) * 1024 if value else None
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    reset = True
  except OSError:
    reset = False
  out, base = {}, kib("VmRSS" if reset else "VmHWM")
  yield out
  end = kib("VmHWM")
  out.update(growth=None if end is None or base is None else max(0, end - base), how=(
      "peak RSS growth (VmHWM reset per side via /proc/self/clear_refs)" if reset else
      "growth of the process's lifetime peak RSS (VmHWM; clear_refs not writable)"))


def timed_steps(step, warmup: int, steps: int):
  """step(i) for i < warmup + steps, each timed alone (step blocks until its work is done):
  (seconds per step, outputs as floats, contention over the timed steps)."""
  times, outs = [], []
  with contextlib.ExitStack() as stack:
    for i in range(warmup + steps):
      if i == warmup:
        busy = stack.enter_context(contention())
      t = time.perf_counter()
      outs.append(step(i))
      times.append(time.perf_counter() - t)
  return times, [float(x) for x in outs], busy["others"]


def step_stats(times, losses, warmup: int, tokens_per_step: int) -> dict:
  timed = times[warmup:]
  med = statistics.median(timed)
  return {"first_step_s": times[0], "step_s": timed, "warmup_step_s": times[:warmup],
          "ms_per_step": med * 1e3, "ms_per_step_min": min(timed) * 1e3,
          "tok_per_s": tokens_per_step / med, "losses": losses, "loss_first": losses[0],
          "loss_last": losses[-1]}


def error_text(e: BaseException) -> str:
  return f"{type(e).__name__}: {str(e)[:300]}"


def is_oom(e: BaseException) -> bool:
  text = error_text(e)
  return "RESOURCE_EXHAUSTED" in text or "OutOfMemoryError" in text or \
      "out of memory" in text.lower()


def fmt_bytes(n) -> str:
  if n is None:
    return "-"
  return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def pct(x, digits: int = 1, none: str = "-") -> str:
  return none if x is None else f"{100 * x:.{digits}f}%"


def busy_cells(others) -> str:
  """'others busy' of several runs: '3%, 50%' ('?' where unknown)."""
  return ", ".join(pct(o, 0) for o in others if o is not None) or "?"


def md_table(header, rows, right=()) -> list[str]:
  """Markdown table lines; columns in `right` right-aligned, short rows padded."""
  sep = "|" + "|".join("---:" if i in right else "---" for i in range(len(header))) + "|"
  return ["| " + " | ".join(header) + " |", sep] + [
      "| " + " | ".join(str(c) for c in [*row, *[""] * (len(header) - len(row))]) + " |"
      for row in rows]


def verdict(met: bool, env) -> str:
  """An H200 target's verdict: only a GPU run decides it."""
  if not env.get("gpu"):
    return "n/a, not a GPU run"
  where = "" if "H200" in str(env.get("jax_device")) else f" (on a {env.get('jax_device')})"
  return ("met" if met else "not met") + where


def print_side(rec):
  print(f"  first step {rec['first_step_s']:.2f} s; timed steps "
        f"{', '.join(f'{t * 1e3:.1f}' for t in rec['step_s'])} ms; median "
        f"{rec['ms_per_step']:.1f} ms = {rec['tok_per_s']:,.0f} tok/s; peak memory "
        f"{fmt_bytes(rec['peak_bytes'])} ({rec['memory_how']}); losses "
        f"{', '.join(f'{x:.4f}' for x in rec['losses'])}", flush=True)


def add_step_flags(ap, lr: float, weight_decay: float) -> None:
  """The flags train_speed.py and finetune.py share."""
  add = ap.add_argument
  add("--steps", type=int, default=10, help="timed steps per side")
  add("--warmup", type=int, default=2, help="untimed steps before them")
  add("--jax_attention", default="auto", choices=("auto", "xla", "cudnn"), help="auto: cudnn "
      "on a GPU (finetune.py: in bfloat16), else xla; a cudnn failure falls back to xla")
  add("--torch_compile", action=argparse.BooleanOptionalAction, default=None,
      help="torch.compile the HF model (default: on with CUDA, off on CPU)")
  add("--torch_compile_mode", default=None, help="e.g. max-autotune")
  add("--lr", type=float, default=lr)
  add("--weight_decay", type=float, default=weight_decay)
  add("--grad_clip", type=float, default=1.0, help="global-norm clip (0: none)")
  add("--loss_tol", type=float, default=1e-3,
      help="float32 step-0 loss agreement required across sides (exit code 2 otherwise)")
  add("--num_layers", type=int, default=0, help="every model's layer count (smoke tests)")
  add("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
  add("--seed", type=int, default=0)
  add("--json_out", default=None)


def run(cmd, log=None, *, env=None, timeout=None, cwd=REPO) -> dict:
  """Runs cmd in a process group of its own (killed whole at `timeout` or on Ctrl-C), output
  to `log` or ours: {returncode, status, wall_s, peak_rss_mib (the child's), others}."""
  def stop(pid):
    for sig in (signal.SIGTERM, signal.SIGKILL):
      try:
        os.killpg(pid, sig)
      except ProcessLookupError:
        return
      for _ in range(100):
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
          return
        time.sleep(0.1)
  out = open(log, "w") if log else None  # pylint: disable=consider-using-with
  if out:
    out.write("$ " + shlex.join(map(str, cmd)) + "\n")
    out.flush()
  busy0, t0 = busy_cpu_seconds(), time.perf_counter()
  proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stdin=subprocess.DEVNULL,
                          stderr=subprocess.STDOUT if out else None, start_new_session=True)
  killed = False
  try:
    while True:  # os.wait4: the child's own resource usage
      pid, code, usage = os.wait4(proc.pid, 0 if timeout is None else os.WNOHANG)
      if pid:
        break
      if time.perf_counter() - t0 > timeout:
        stop(proc.pid)
        killed = True
      time.sleep(0.05)
  except KeyboardInterrupt:
    stop(proc.pid)
    raise
  finally:
    if out:
      out.close()
  wall = time.perf_counter() - t0
  proc.returncode = rc = os.waitstatus_to_exitcode(code)
  status = f"killed at {timeout:.0f} s" if killed else "ok" if rc == 0 else f"exit code {rc}"
  return {"returncode": rc, "status": status, "wall_s": wall,
          "peak_rss_mib": usage.ru_maxrss / 1024, "others": others_busy(
              busy0, busy_cpu_seconds(), usage.ru_utime + usage.ru_stime, wall)}


def init_params(config, seed: int) -> dict:
  """decoder_jax's random init as {flat path: numpy}, made on JAX's CPU backend so a GPU's
  memory statistics start with the timed side."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from decoder_jax.model import Decoder
  with jax.default_device(jax.devices("cpu")[0]):
    init = jax.jit(lambda k: nn.unbox(Decoder(config).init(k, jnp.zeros((1, 8), jnp.int32))))
    params = jax.device_get(init(jax.random.key(seed))["params"])
  return {p: np.asarray(v) for p, v in flat(params).items()}


def flat(tree) -> dict:
  from flax import traverse_util
  return traverse_util.flatten_dict(tree)


def unflat(tree: dict) -> dict:
  from flax import traverse_util
  return traverse_util.unflatten_dict(tree)


def cast(x, dtype):
  import jax.numpy as jnp
  return np.asarray(x).astype(jnp.dtype(dtype))  # numpy / ml_dtypes: round to nearest even


def random_batches(vocab: int, batch: int, seq_len: int, n: int, seed: int) -> list[dict]:
  """n next-token batches {inputs, targets: int32 [batch, seq_len]} of random tokens."""
  tokens = np.random.RandomState(seed).randint(0, vocab, size=(n, batch, seq_len + 1))
  return [{"inputs": t[:, :-1].astype(np.int32), "targets": t[:, 1:].astype(np.int32)}
          for t in tokens]


def train_state(params, args):
  """A TrainState of decoder_jax's AdamW (train.optimizer: decay on matrices and
  embeddings), constant args.lr, betas 0.9/0.999, eps 1e-8, clip args.grad_clip (0: none)."""
  import jax.numpy as jnp
  import ml_collections
  import optax
  from decoder_jax.train import optimizer, state as state_lib
  lr, wd = args.lr, args.weight_decay
  tx = (optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=wd, mask=optimizer.decay_mask)
        if args.grad_clip <= 0 else optimizer.make_optimizer(ml_collections.ConfigDict(dict(
            num_steps=1, learning_rate=lr, min_learning_rate=lr, warmup_steps=0,
            decay_steps=None, b1=0.9, b2=0.999, eps=1e-8, weight_decay=wd,
            grad_clip=args.grad_clip))))
  return state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                              opt_state=tx.init(params), tx=tx)


def compile_train_step(model, state, frozen, batch, rng, **step_kw):
  """jit(train.steps.make_train_step), state donated, compiled ahead of time: (state,
  compiled, {trace_s, compile_s[, state_dtype_note]}). The state is first cast to the dtypes
  the step returns (e.g. float32 Adam moments for bf16 params): one executable serves all."""
  import jax
  from decoder_jax.train import steps as steps_lib
  step = jax.jit(steps_lib.make_train_step(model, 1, dropout=False, **step_kw),
                 donate_argnums=(0,))
  t0 = time.perf_counter()
  out_state, _ = jax.eval_shape(step, state, frozen, batch, rng)
  changed = [f"{a.dtype}->{b.dtype}" for a, b in
             zip(jax.tree.leaves(state), jax.tree.leaves(out_state)) if a.dtype != b.dtype]
  info = {}
  if changed:
    state = jax.tree.map(lambda x, o: x.astype(o.dtype), state, out_state)
    info["state_dtype_note"] = (f"the step returns {len(changed)} state leaves as "
                                f"{', '.join(sorted(set(changed)))}; timed from there")
    print(f"  note: {info['state_dtype_note']}", flush=True)
  lowered = step.lower(state, frozen, batch, rng)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  return state, compiled, dict(info, trace_s=t1 - t0, compile_s=time.perf_counter() - t1)


def jax_side(rec, prepare, impl, batches, seed, warmup, steps, after=None):
  """Times decoder_jax training steps into `rec`: prepare(impl, batch, rng) -> (state, frozen,
  compiled, info), retried with "xla" after a failure that is not out of memory (a cuDNN
  compile error); after(compiled, state, batches, rng) -> more of rec, after the timing."""
  import jax
  device = jax.devices()[0]
  stats = lambda: (device.memory_stats() or {}) if device.platform == "gpu" else {}  # noqa: E731
  mem0, dev, rng = stats(), [jax.device_put(b) for b in batches], jax.random.key(seed)
  with host_peak() as host:
    try:
      state, frozen, compiled, info = prepare(impl, dev[0], rng)
    except Exception as e:  # pylint: disable=broad-except
      if impl == "xla" or is_oom(e):
        raise
      rec["attention_fallback"], impl = error_text(e), None
      print(f"  WARNING: attention failed ({rec['attention_fallback']}); using 'xla'", flush=True)
    if impl is None:  # outside the except block, whose traceback held the device buffers
      gc.collect()
      impl = "xla"
      state, frozen, compiled, info = prepare(impl, dev[0], rng)
    try:  # bytes XLA plans for one call: arguments + outputs + temporaries - donated aliases
      m = compiled.memory_analysis()
      plan = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
              - m.alias_size_in_bytes)
    except Exception:  # pylint: disable=broad-except  # not every backend plans
      plan = None
    rec.update(info, attention_impl=impl, xla_estimate_bytes=plan,
               trainable=sum(x.size for x in jax.tree.leaves(state.params)))
    rec["total_params"] = rec["trainable"] + sum(x.size for x in jax.tree.leaves(frozen))
    print(f"  decoder_jax: {rec['trainable']:,} trainable of {rec['total_params']:,} params, "
          f"attention {impl}, remat {rec.get('remat')}, trace {rec['trace_s']:.1f} s + compile "
          f"{rec['compile_s']:.1f} s, XLA plans {fmt_bytes(plan)}", flush=True)

    def step(i):
      nonlocal state
      state, metrics = compiled(state, frozen, dev[i % len(dev)], rng)
      jax.block_until_ready((state, metrics))
      return metrics["loss"]
    times, losses, rec["others_busy"] = timed_steps(step, warmup, steps)
    mem1 = stats()
    rec.update(after(compiled, state, dev, rng) if after else {})
    state = frozen = compiled = dev = None  # the device buffers go before the next side
    gc.collect()
  rec.update(step_stats(times, losses, warmup, batches[0]["inputs"].size))
  if device.platform != "gpu":
    return dict(rec, peak_bytes=host["growth"], memory_how=host["how"])
  peak0, peak1 = mem0.get("peak_bytes_in_use"), mem1.get("peak_bytes_in_use")
  return dict(rec, peak_bytes=peak1, bytes_limit=mem1.get("bytes_limit"),
              memory_how="jax peak_bytes_in_use (process lifetime)",
              peak_is_upper_bound=bool(peak0) and peak1 == peak0)


def hf_model(config, device="cpu", **overrides):
  """A transformers model of `config`'s architecture (interop.hf.config_to_hf: GPT-2, Llama,
  Qwen2), SDPA attention, float32, HF's own random init."""
  import torch
  import transformers
  from decoder_jax.interop import hf as hf_interop
  values = {**hf_interop.config_to_hf(config), **overrides}
  hf_config = transformers.AutoConfig.for_model(values.pop("model_type"), **values,
                                                attn_implementation="sdpa")
  with torch.device(device):
    return getattr(transformers, hf_config.architectures[0])(hf_config)


def hf_state_dict(config, params) -> dict:
  """{HF tensor name: float32 numpy} of decoder_jax params ({flat path: array}, scanned or
  not) through interop.hf's tensor map; fused tensors (GPT-2's c_attn) assembled."""
  from decoder_jax.interop import hf as hf_interop
  params = {p: np.asarray(v) for p, v in params.items()}
  links = hf_interop.tensor_links(config)
  where = hf_interop.unscanned_leaves(config, params)
  hf_interop.check_links_cover(config, links, where)
  parts = {}
  for link in links:
    path, layer = where[link.ours]
    leaf = params[path] if layer is None else params[path][layer]
    parts.setdefault(link.hf, []).append((link.part or (0, 0), link.to_hf(leaf)))
  return {name: np.ascontiguousarray(np.concatenate([t for _, t in sorted(p, key=lambda x: x[0])],
                                                    axis=-1), np.float32)
          for name, p in parts.items()}


def load_into_hf(model, state: dict) -> None:
  """Copies hf_state_dict's tensors into `model` (cast to its dtype and device)."""
  import torch
  own = model.state_dict()
  tied = (model.get_output_embeddings().weight.data_ptr()
          == model.get_input_embeddings().weight.data_ptr())
  missing = [k for k in own if k not in state and not (tied and k == "lm_head.weight")]
  wrong = [k for k, v in state.items() if k not in own or tuple(own[k].shape) != v.shape]
  if missing or wrong:
    raise RuntimeError(f"HF state dict mismatch: missing {missing[:5]}, unknown or "
                       f"misshapen {wrong[:5]}")
  with torch.no_grad():
    for k, v in state.items():
      own[k].copy_(torch.from_numpy(v))


class HfTrainer:
  """`config`'s HF model (weights from `state`, else HF's seeded init; wrap(model): PEFT) and
  its training step: the model's loss over every position, torch AdamW (decay on rank >= 2,
  as decoder_jax; fused on CUDA), global-norm clip, optional torch.compile and autocast."""

  def __init__(self, config, args, device, dtype, state=None, *, checkpointing, compile,
               autocast=False, wrap=None):
    import torch
    torch.manual_seed(args.seed)
    model = hf_model(config, device, use_cache=False).to(dtype=getattr(torch, dtype))
    if state is not None:
      load_into_hf(model, state)
    if checkpointing:
      kwargs = {"use_reentrant": False}  # works with a frozen base (PEFT) without input grads
      if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
      else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    self.model = model = wrap(model) if wrap else model
    model.train()
    self.torch, self.grad_clip, self.autocast = torch, args.grad_clip, autocast
    self.device = next(model.parameters()).device
    self.cuda = self.device.type == "cuda"
    self.params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in self.params if p.dim() >= 2],
               "weight_decay": args.weight_decay},
              {"params": [p for p in self.params if p.dim() < 2], "weight_decay": 0.0}]
    self.opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                                 fused=True if self.cuda else None)
    self.optimizer = "AdamW fused" if self.cuda else "AdamW (foreach default)"
    self.compiled, self.dynamic = compile, False
    self.forward = torch.compile(model, mode=args.torch_compile_mode) if compile else model

  def step(self, inputs, targets):
    torch = self.torch
    with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
      out = self.forward(input_ids=inputs, labels=targets, shift_labels=targets,
                         use_cache=False)  # shift_labels: no shift, every position
    out.loss.backward()
    if self.grad_clip > 0:
      torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    return out.loss.detach()

  def run(self, batches, warmup, steps, rec):
    """timed_steps over numpy batches; a torch.compile failure in the first step falls back
    to eager (rec["torch_compile_error"]). self.dynamic marks the batch axis dynamic: one
    compile serves every batch size (the batch search)."""
    dev = [{k: self.torch.from_numpy(v.astype(np.int64)).to(self.device) for k, v in b.items()}
           for b in batches]
    for t in (t for b in dev for t in b.values()) if self.compiled and self.dynamic else ():
      self.torch._dynamo.maybe_mark_dynamic(t, 0)  # pylint: disable=protected-access

    def step(i):
      b = dev[i % len(dev)]
      try:
        loss = self.step(b["inputs"], b["targets"])
      except Exception as e:  # pylint: disable=broad-except
        if i > 0 or not self.compiled or is_oom(e):
          raise
        rec["torch_compile_error"] = error_text(e)
        print(f"  WARNING: torch.compile failed ({rec['torch_compile_error']}); running eager",
              flush=True)
        self.opt.zero_grad(set_to_none=True)
        self.forward, self.compiled = self.model, False
        loss = self.step(b["inputs"], b["targets"])
      if self.cuda:
        self.torch.cuda.synchronize()
      return loss
    out = timed_steps(step, warmup, steps)
    rec["torch_compile"] = self.compiled
    return out


def hf_side(rec, build, batches, warmup, steps):
  """Times an HfTrainer's steps into `rec`; build() -> HfTrainer runs inside the memory
  measurement (model, weights and optimizer count)."""
  import torch
  cuda = torch.cuda.is_available()
  if cuda:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
  with host_peak() as host:
    hf = build()
    rec.update(attn_implementation=hf.model.config._attn_implementation,  # pylint: disable=protected-access
               optimizer=hf.optimizer, trainable=sum(p.numel() for p in hf.params),
               total_params=sum(p.numel() for p in hf.model.parameters()))
    on = lambda x: "on" if x else "off"  # noqa: E731
    print(f"  HF {type(hf.model).__name__}: {rec['trainable']:,} trainable of "
          f"{rec['total_params']:,} params, attention {rec['attn_implementation']}, "
          f"{'autocast bf16' if hf.autocast else 'no autocast'}, torch.compile "
          f"{on(hf.compiled)}, gradient checkpointing "
          f"{on(getattr(hf.model, 'is_activation_checkpointing', False))}, {hf.optimizer}",
          flush=True)
    times, losses, rec["others_busy"] = hf.run(batches, warmup, steps, rec)
    del hf
    gc.collect()
  rec.update(step_stats(times, losses, warmup, batches[0]["inputs"].size))
  if not cuda:
    return dict(rec, peak_bytes=host["growth"], memory_how=host["how"])
  return dict(rec, peak_bytes=torch.cuda.max_memory_allocated(),
              peak_reserved_bytes=torch.cuda.max_memory_reserved(),
              memory_how="torch.cuda.max_memory_allocated (reset per side)")
