"""What the benchmarks share: machine facts, contention, step timing, subprocesses, markdown
tables, and decoder_jax's weights in a Hugging Face model (through decoder_jax.interop.hf)."""

from __future__ import annotations

import datetime
import gc
import importlib.metadata
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

# ----------------------------------------------------------------------------- machine


def version(dist: str) -> str:
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return "not installed"


def cores() -> int:
  """CPU cores this process may run on."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _cpuinfo(field: str):
  try:
    with open("/proc/cpuinfo") as f:
      return next((line.split(":", 1)[1].strip() for line in f if line.startswith(field)), None)
  except OSError:
    return None


def cpu_name() -> str:
  return _cpuinfo("model name") or platform.processor() or platform.machine()


def matmul_features() -> str:
  """The CPU's matrix instruction sets that decide XLA's bfloat16 dot speed (Linux)."""
  flags = (_cpuinfo("flags") or "").split()
  wanted = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2")
  return ", ".join(f for f in wanted if f in flags) or "none of " + "/".join(wanted)


def data_dir() -> str:
  """$DECODER_JAX_DATA, else <repo>/../shared/data (development machines)."""
  return os.environ.get("DECODER_JAX_DATA") or str(REPO.parent / "shared" / "data")


def env_facts(dists=("jax", "jaxlib", "flax", "optax", "torch", "transformers")) -> dict:
  """Date, interpreter, CPU and package versions: what every benchmark records."""
  env = {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
         "python": platform.python_version(), "platform": platform.platform(),
         "cpu": cpu_name(), "cores": cores(), **{d: version(d) for d in dists}}
  env.update({p: version(p) for p in PLUGINS if version(p) != "not installed"})
  env["loadavg_start"] = os.getloadavg()
  return env


def hardware_versions(env, dists) -> str:
  hw = (f"{env.get('jax_device')} (torch: {env.get('torch_gpu', '-')}, CUDA "
        f"{env.get('torch_cuda', '-')})" if env.get("gpu") else
        f"{env.get('cpu')}, {env.get('cores')} cores (CPU)")
  versions = [f"python {env.get('python')}", f"jax/jaxlib {env.get('jax')}/{env.get('jaxlib')}"]
  versions += [f"{d} {env.get(d)}" for d in dists] + [f"{p} {env[p]}" for p in PLUGINS if p in env]
  return f"Hardware: {hw}. Versions: {', '.join(versions)}."


# ----------------------------------------------------------------------------- contention


def busy_cpu_seconds():
  """Busy CPU seconds of the whole machine (all cores), or None off Linux."""
  try:
    with open("/proc/stat") as f:
      fields = [int(x) for x in f.readline().split()[1:]]
  except OSError:
    return None
  idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
  return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu() -> float:
  t = os.times()  # this process and its waited-for children
  return t.user + t.system + t.children_user + t.children_system


class Contention:
  """How busy *other* processes kept the cores while a block ran (`others`: share of all
  cores, None off Linux). A child's CPU counts as our own once it has been waited for."""

  def __enter__(self):
    self.busy0, self.own0, self.t0 = busy_cpu_seconds(), _own_cpu(), time.perf_counter()
    self.others = None
    return self

  def __exit__(self, *exc):
    wall, busy1 = time.perf_counter() - self.t0, busy_cpu_seconds()
    if self.busy0 is not None and busy1 is not None and wall > 0:
      own = _own_cpu() - self.own0
      self.others = max(0.0, busy1 - self.busy0 - own) / (wall * cores())
    return False


def _status_bytes(field: str):
  try:
    with open("/proc/self/status") as f:
      return next((int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":")),
                  None)
  except OSError:
    return None


class HostPeak:
  """Growth of this process's peak RSS over a block (VmHWM). Writing 5 to
  /proc/self/clear_refs resets VmHWM to the current RSS, so the growth is the block's own
  peak; where that is refused it is how far the block raised the lifetime peak."""

  def __enter__(self):
    try:
      with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
      self.reset = True
    except OSError:
      self.reset = False
    self.rss0, self.hwm0, self.growth = _status_bytes("VmRSS"), _status_bytes("VmHWM"), None
    return self

  def __exit__(self, *exc):
    hwm1 = _status_bytes("VmHWM")
    if hwm1 is not None and self.rss0 is not None:
      self.growth = max(0, hwm1 - (self.rss0 if self.reset else self.hwm0))
    return False

  @property
  def how(self) -> str:
    return ("peak RSS growth (VmHWM reset per side via /proc/self/clear_refs)" if self.reset
            else "growth of the process's lifetime peak RSS (VmHWM; clear_refs not writable)")


# ----------------------------------------------------------------------------- timing


def median(xs):
  return statistics.median(xs) if xs else None


def timed_steps(step, warmup: int, steps: int):
  """step(i) for i < warmup + steps, each timed alone (step blocks until its work is done):
  (seconds per step, outputs, contention over the timed steps)."""
  times, outs, busy = [], [], Contention()
  for i in range(warmup + steps):
    if i == warmup:
      busy.__enter__()
    t = time.perf_counter()
    outs.append(step(i))
    times.append(time.perf_counter() - t)
  busy.__exit__()
  return times, outs, busy.others


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


# ----------------------------------------------------------------------------- output


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
  """Markdown table lines; columns whose index is in `right` are right-aligned, short rows
  are padded with empty cells."""
  sep = "|" + "|".join("---:" if i in right else "---" for i in range(len(header))) + "|"
  pad = lambda row: list(row) + [""] * (len(header) - len(row))  # noqa: E731
  return ["| " + " | ".join(header) + " |", sep] + [
      "| " + " | ".join(str(c) for c in pad(row)) + " |" for row in rows]


def verdict(met: bool, env) -> str:
  """An H200 target's verdict: only a GPU run decides it."""
  if not env.get("gpu"):
    return "n/a, not a GPU run"
  where = "" if "H200" in str(env.get("jax_device")) else f" (on a {env.get('jax_device')})"
  return ("met" if met else "not met") + where


def append_section(path, title, env, header, lines) -> None:
  """--table_out: a markdown section (date, the command, a header paragraph, `lines`)."""
  text = ["", f"## {title} ({env['date_utc']} UTC)", "", f"`{env['command']}`", "", header, ""]
  with open(path, "a") as f:
    f.write("\n".join(text + list(lines)) + "\n")
  print(f"appended a section to {path}")


def command_line(script: str, argv) -> str:
  return "python " + shlex.join([f"benchmarks/{script}", *argv])


# ----------------------------------------------------------------------------- subprocesses


def _stop(pid: int) -> None:
  """SIGTERM to the child's process group (a train_speed.py parent then ends its own
  children, each in a session of its own), SIGKILL 10 s later."""
  for sig in (signal.SIGTERM, signal.SIGKILL):
    try:
      os.killpg(pid, sig)
    except ProcessLookupError:
      return
    for _ in range(100):
      if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
        return
      time.sleep(0.1)


def run(cmd, log=None, *, env=None, timeout=None, cwd=REPO) -> dict:
  """Runs cmd in a process group of its own (killed whole at `timeout` or on Ctrl-C), its
  output to the file `log` (headed by the command) or ours. Returns {"returncode",
  "status" ("ok", "exit code N", "killed at N s"), "wall_s", "peak_rss_mib" (of the child),
  "others" (how busy other processes kept the cores meanwhile)}."""
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
        _stop(proc.pid)
        killed = True
      time.sleep(0.05)
  except KeyboardInterrupt:
    _stop(proc.pid)
    raise
  finally:
    if out:
      out.close()
  wall, busy1 = time.perf_counter() - t0, busy_cpu_seconds()
  proc.returncode = rc = os.waitstatus_to_exitcode(code)
  others = None
  if busy0 is not None and busy1 is not None:
    others = max(0.0, busy1 - busy0 - usage.ru_utime - usage.ru_stime) / (wall * cores())
  status = f"killed at {timeout:.0f} s" if killed else "ok" if rc == 0 else f"exit code {rc}"
  return {"returncode": rc, "status": status, "wall_s": wall,
          "peak_rss_mib": usage.ru_maxrss / 1024, "others": others}


# ----------------------------------------------------------------------------- decoder_jax side


def init_params(config, seed: int) -> dict:
  """decoder_jax's random init as {flat path: numpy} (config's layout and param dtype), made
  on JAX's CPU backend so a GPU's memory statistics start with the timed side."""
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


def unflat(flat: dict) -> dict:
  from flax import traverse_util
  return traverse_util.unflatten_dict(flat)


def cast(x, dtype):
  import jax.numpy as jnp
  return np.asarray(x).astype(jnp.dtype(dtype))  # numpy / ml_dtypes: round to nearest even


def random_batches(vocab: int, batch: int, seq_len: int, n: int, seed: int) -> list[dict]:
  """n next-token batches {inputs, targets: int32 [batch, seq_len]} of random tokens."""
  tokens = np.random.RandomState(seed).randint(0, vocab, size=(n, batch, seq_len + 1))
  return [{"inputs": t[:, :-1].astype(np.int32), "targets": t[:, 1:].astype(np.int32)}
          for t in tokens]


def make_tx(lr: float, weight_decay: float, grad_clip: float):
  """decoder_jax's AdamW (train.optimizer: decay on matrices and embeddings) at a constant
  lr, betas 0.9/0.999, eps 1e-8, after a global-norm clip (0: none)."""
  import ml_collections
  import optax
  from decoder_jax.train import optimizer
  if grad_clip <= 0:
    return optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay,
                       mask=optimizer.decay_mask)
  return optimizer.make_optimizer(ml_collections.ConfigDict(dict(
      num_steps=1, learning_rate=lr, min_learning_rate=lr, warmup_steps=0, decay_steps=None,
      b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay, grad_clip=grad_clip)))


def compile_train_step(model, state, frozen, batch, rng, **step_kw):
  """jit(train.steps.make_train_step) with the state donated, lowered and compiled ahead of
  time: (state, compiled, {trace_s, compile_s[, state_dtype_note]}). The state is cast to
  the dtypes the step returns (should it return e.g. float32 Adam moments for bf16 params),
  so one executable, with donation, serves every step."""
  import jax
  from decoder_jax.train import steps as steps_lib
  step = jax.jit(steps_lib.make_train_step(model, 1, dropout=False, **step_kw),
                 donate_argnums=(0,))
  t0 = time.perf_counter()
  out_state, _ = jax.eval_shape(step, state, frozen, batch, rng)
  pairs = [(a.dtype, b.dtype) for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(out_state))]
  changed = [f"{a}->{b}" for a, b in pairs if a != b]
  info = {}
  if changed:
    state = jax.tree.map(lambda x, o: x.astype(o.dtype), state, out_state)
    info["state_dtype_note"] = (f"the step returns {len(changed)} state leaves as "
                                f"{', '.join(sorted(set(changed)))}; timed from there")
    print(f"  note: {info['state_dtype_note']}", flush=True)
  lowered = step.lower(state, frozen, batch, rng)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  info.update(trace_s=t1 - t0, compile_s=time.perf_counter() - t1)
  return state, compiled, info


def with_attention_fallback(prepare, impl: str, rec: dict):
  """(prepare(impl), impl), or prepare("xla") after a failure that is not out of memory (a
  cuDNN compile error); rec["attention_fallback"] says why."""
  try:
    return prepare(impl), impl
  except Exception as e:  # pylint: disable=broad-except
    if impl == "xla" or is_oom(e):
      raise
    rec["attention_fallback"] = error_text(e)
    print(f"  WARNING: attention {impl!r} failed ({rec['attention_fallback']}); using 'xla'",
          flush=True)
  gc.collect()  # outside the except block, whose traceback held the device buffers
  return prepare("xla"), "xla"


def jax_steps(compiled, state, frozen, batches, rng, warmup, steps):
  """(state, seconds per step, losses, contention) of warmup + steps compiled steps."""
  import jax

  def step(i):
    nonlocal state
    state, metrics = compiled(state, frozen, batches[i % len(batches)], rng)
    jax.block_until_ready((state, metrics))
    return metrics["loss"]

  times, losses, others = timed_steps(step, warmup, steps)
  return state, times, [float(x) for x in losses], others


def jax_memory(device) -> dict:
  try:
    return device.memory_stats() or {}
  except Exception:  # pylint: disable=broad-except  # not every backend has statistics
    return {}


def xla_estimate(compiled):
  """Bytes XLA plans for one call: arguments + outputs + temporaries - donated aliases."""
  try:
    m = compiled.memory_analysis()
    return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
            - m.alias_size_in_bytes)
  except Exception:  # pylint: disable=broad-except  # not every backend plans
    return None


def jax_side(rec, prepare, impl, batches, seed, warmup, steps, after=None):
  """Times decoder_jax training steps into `rec`. prepare(impl, first batch, rng) ->
  (state, frozen, compiled, info for rec) on the device (with_attention_fallback around it);
  after(compiled, state, batches, rng) -> more of rec, run after the timed steps. Memory:
  the GPU's peak_bytes_in_use (process lifetime: '<=' when an earlier side set it), or the
  process's peak RSS growth."""
  import jax
  device = jax.devices()[0]
  mem0, dev, rng = jax_memory(device), [jax.device_put(b) for b in batches], jax.random.key(seed)
  with HostPeak() as host:
    (state, frozen, compiled, info), rec["attention_impl"] = with_attention_fallback(
        lambda i: prepare(i, dev[0], rng), impl, rec)
    rec.update(info, xla_estimate_bytes=xla_estimate(compiled))
    rec["trainable"] = sum(x.size for x in jax.tree.leaves(state.params))
    rec["total_params"] = rec["trainable"] + sum(x.size for x in jax.tree.leaves(frozen))
    print(f"  decoder_jax: {rec['trainable']:,} trainable of {rec['total_params']:,} params, "
          f"attention {rec['attention_impl']}, remat {rec.get('remat')}, trace "
          f"{rec['trace_s']:.1f} s + compile {rec['compile_s']:.1f} s, XLA plans "
          f"{fmt_bytes(rec.get('xla_estimate_bytes'))}", flush=True)
    state, times, losses, rec["others_busy"] = jax_steps(compiled, state, frozen, dev, rng,
                                                         warmup, steps)
    mem1 = jax_memory(device)
    rec.update(after(compiled, state, dev, rng) if after else {})
    state = frozen = compiled = dev = None  # the device buffers go before the next side
    gc.collect()
  rec.update(step_stats(times, losses, warmup, batches[0]["inputs"].size))
  if device.platform == "gpu":
    peak0, peak1 = mem0.get("peak_bytes_in_use"), mem1.get("peak_bytes_in_use")
    rec.update(peak_bytes=peak1, bytes_limit=mem1.get("bytes_limit"),
               memory_how="jax peak_bytes_in_use (process lifetime)",
               peak_is_upper_bound=bool(peak0) and peak1 == peak0)
  else:
    rec.update(peak_bytes=host.growth, memory_how=host.how)
  return rec


# ----------------------------------------------------------------------------- Hugging Face side


def hf_model(config, device="cpu", **overrides):
  """A transformers model of `config`'s architecture (interop.hf.config_to_hf: GPT-2,
  Llama, Qwen2), SDPA attention, float32, HF's own random init."""
  import torch
  import transformers
  from decoder_jax.interop import hf as hf_interop
  values = {**hf_interop.config_to_hf(config), **overrides}
  hf_config = transformers.AutoConfig.for_model(values.pop("model_type"), **values,
                                                attn_implementation="sdpa")
  with torch.device(device):
    return getattr(transformers, hf_config.architectures[0])(hf_config)


def hf_state_dict(config, flat) -> dict:
  """{HF tensor name: float32 numpy} of decoder_jax params ({flat path: array}, scanned or
  not) through interop.hf's tensor map; fused tensors (GPT-2's c_attn) assembled."""
  from decoder_jax.interop import hf as hf_interop
  flat = {p: np.asarray(v) for p, v in flat.items()}
  links = hf_interop.tensor_links(config)
  where = hf_interop.unscanned_leaves(config, flat)
  hf_interop.check_links_cover(config, links, where)
  parts = {}
  for link in links:
    path, layer = where[link.ours]
    leaf = flat[path] if layer is None else flat[path][layer]
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


def enable_checkpointing(model) -> None:
  kwargs = {"use_reentrant": False}  # works with a frozen base (PEFT) without input grads
  if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
    model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
  else:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


class HfTrainer:
  """A transformers model's training step: the loss from the model over every position
  (labels = shift_labels = targets), torch AdamW over the trainable tensors (weight decay on
  rank >= 2 only, as decoder_jax; fused on CUDA), global-norm clip, optional torch.compile
  and bfloat16 autocast."""

  def __init__(self, model, *, lr, weight_decay, grad_clip, compile=False, compile_mode=None,
               autocast=False):
    import torch
    self.torch, self.model, self.grad_clip, self.autocast = torch, model, grad_clip, autocast
    self.device = next(model.parameters()).device
    self.cuda = self.device.type == "cuda"
    self.params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in self.params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in self.params if p.dim() < 2], "weight_decay": 0.0}]
    self.opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8,
                                 fused=True if self.cuda else None)
    self.optimizer = "AdamW fused" if self.cuda else "AdamW (foreach default)"
    self.compiled, self.dynamic = compile, False
    self.forward = torch.compile(model, mode=compile_mode) if compile else model

  def sync(self):
    if self.cuda:
      self.torch.cuda.synchronize()

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
    """(seconds per step, losses, contention) over numpy batches; a torch.compile failure
    in the first step falls back to eager (rec["torch_compile_error"]). self.dynamic marks
    the batch axis dynamic: one compile serves every batch size (the batch search)."""
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
      self.sync()
      return loss

    times, losses, others = timed_steps(step, warmup, steps)
    rec["torch_compile"] = self.compiled
    return times, [float(x) for x in losses], others


def torch_peak(host) -> dict:
  """A torch side's peak memory: torch.cuda.max_memory_allocated, or host's RSS growth."""
  import torch
  if torch.cuda.is_available():
    return {"peak_bytes": torch.cuda.max_memory_allocated(),
            "peak_reserved_bytes": torch.cuda.max_memory_reserved(),
            "memory_how": "torch.cuda.max_memory_allocated (reset per side)"}
  return {"peak_bytes": host.growth, "memory_how": host.how}


def torch_reset_peak() -> None:
  """Starts a side's torch.cuda peak statistics (a no-op without CUDA)."""
  import torch
  if torch.cuda.is_available():
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()


def hf_side(rec, build, batches, warmup, steps):
  """Times an HfTrainer's steps into `rec`; build() -> HfTrainer (called inside the memory
  measurement: model, weights and optimizer count)."""
  torch_reset_peak()
  with HostPeak() as host:
    hf = build()
    rec.update(attn_implementation=hf.model.config._attn_implementation,  # pylint: disable=protected-access
               optimizer=hf.optimizer, trainable=sum(p.numel() for p in hf.params),
               total_params=sum(p.numel() for p in hf.model.parameters()))
    print(f"  HF {type(hf.model).__name__}: {rec['trainable']:,} trainable of "
          f"{rec['total_params']:,} params, attention {rec['attn_implementation']}, "
          f"{'autocast bf16' if hf.autocast else 'no autocast'}, torch.compile "
          f"{'on' if hf.compiled else 'off'}, gradient checkpointing "
          f"{'on' if getattr(hf.model, 'is_activation_checkpointing', False) else 'off'}, "
          f"{hf.optimizer}", flush=True)
    times, losses, rec["others_busy"] = hf.run(batches, warmup, steps, rec)
    del hf
    gc.collect()
  rec.update(step_stats(times, losses, warmup, batches[0]["inputs"].size), **torch_peak(host))
  return rec


def print_side(rec):
  print(f"  first step {rec['first_step_s']:.2f} s; timed steps "
        f"{', '.join(f'{t * 1e3:.1f}' for t in rec['step_s'])} ms; median "
        f"{rec['ms_per_step']:.1f} ms = {rec['tok_per_s']:,.0f} tok/s; peak memory "
        f"{fmt_bytes(rec['peak_bytes'])} ({rec['memory_how']}); losses "
        f"{', '.join(f'{x:.4f}' for x in rec['losses'])}", flush=True)
