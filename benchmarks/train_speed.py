"""Pretraining step throughput, side by side: decoder_jax vs. Hugging Face transformers, on
GPT-2 124M, SmolLM2-135M and Llama-3.2-1B architectures with the same weights, each side of
each model in a child process of its own. See benchmarks/README.md.

  python benchmarks/train_speed.py --models gpt2,smollm2 --json_out /tmp/ts.json
  python benchmarks/train_speed.py --models none --max_batch_search --loss_chunk 8192
  python benchmarks/train_speed.py --models gpt2,smollm2 --num_layers 2 --batch 2 \\
      --seq_len 64 --steps 2 --warmup 1                                      # CPU smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback

# Set before jax is imported, in this process and (through the environment) the children.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import numpy as np  # pylint: disable=wrong-import-position

import common  # pylint: disable=wrong-import-position
from decoder_jax import xla_flags  # pylint: disable=wrong-import-position

LLAMA_1B = dict(family="llama", vocab_size=128256, num_layers=16, num_heads=32, num_kv_heads=8,
                width=2048, mlp_width=8192, max_length=2048, use_bias=False,
                tie_embeddings=True, rope_theta=500000.0, norm_eps=1e-5)
MODELS = {  # name -> label, preset or ModelConfig fields, default shape, layers
    "gpt2": dict(label="GPT-2 124M", preset="gpt2-small", batch=16, seq_len=1024, layers=12),
    "smollm2": dict(label="SmolLM2-135M arch.", preset="smollm2-135m", batch=32, seq_len=512,
                    layers=30),
    "llama1b": dict(label="Llama-3.2-1B arch.", fields=LLAMA_1B, batch=8, seq_len=2048,
                    layers=16),
}
SIDES = ("jax", "hf")
SIDE_LABELS = {"jax": "decoder_jax", "hf": "HF transformers"}
# Targets on an H200 (bf16), from the issue.
SPEED_TARGETS = {"gpt2": 1.2, "smollm2": 1.3}  # decoder_jax / HF tokens per second
MFU_TARGET = {"llama1b": 0.55}
NANOGPT_TOK_S = 480e3  # nanoGPT GPT-2 124M on an H200 (the figure)
DISTS = ("flax", "optax", "torch", "transformers")


def shape_of(name, args):
  """(batch, seq_len) of a model after --batch / --seq_len (a number, or {model: number})."""
  pick = lambda v, key: MODELS[name][key] if v is None else v if isinstance(v, int) else \
      v.get(name, MODELS[name][key])  # noqa: E731
  return pick(args.batch, "batch"), pick(args.seq_len, "seq_len")


def model_config(name, args, seq_len, dtype="float32", param_dtype="float32",
                 attention_impl="xla"):
  from decoder_jax.model import ModelConfig, preset
  spec = MODELS[name]
  overrides = dict(dtype=dtype, param_dtype=param_dtype, scan_layers=True, dropout=0.0,
                   attention_impl=attention_impl, remat=args.remat,
                   **({"num_layers": args.num_layers} if args.num_layers else {}))
  config = (preset(spec["preset"], **overrides) if "preset" in spec else
            ModelConfig.from_dict({**spec["fields"], **overrides}))
  if config.use_rope and seq_len > config.max_length:  # RoPE: any length, given room
    config = ModelConfig.from_dict({**config.to_dict(), "max_length": seq_len, "lora": None})
  return config


def runtime(args):
  """Backend-dependent settings, the same in every child (HF children run JAX on the CPU:
  the parent passes --_gpu); torch's CPU threads in torch's children."""
  if args._gpu is None:  # pylint: disable=protected-access
    import jax
    gpu = jax.default_backend() == "gpu"
  else:
    gpu = bool(args._gpu)  # pylint: disable=protected-access
  child = args._child  # pylint: disable=protected-access
  if not gpu and child.startswith(("model:hf", "search:hf", "peak:torch")):
    import torch
    torch.set_num_threads(args.threads or common.cores())
  precision = args.precision if args.precision != "auto" else ("mixed" if gpu else "float32")
  return {"jax_backend": "gpu" if gpu else "cpu", "gpu": gpu, "precision": precision,
          "compute_dtype": "float32" if precision == "float32" else "bfloat16",
          "param_dtype": "bfloat16" if precision == "bfloat16" else "float32",
          "jax_attention": args.jax_attention,
          "jax_attention_resolved": (("cudnn" if gpu else "xla") if args.jax_attention == "auto"
                                     else args.jax_attention),
          "torch_device": "cuda" if gpu else "cpu",
          "torch_compile": gpu if args.torch_compile is None else args.torch_compile,
          "hf_checkpointing": args.remat == "full"}


def model_facts(config, seq_len) -> dict:
  """Parameter counts and FLOPs per token: 6 N + 6 L T d (README), nanoGPT's 12 L T d."""
  import flax.linen as nn
  from decoder_jax.interop import hf as hf_interop
  shapes = common.flat(nn.unbox(hf_interop.abstract_params(config)))  # nothing allocated
  size = lambda path: int(np.prod(shapes[path].shape)) if path in shapes else 0  # noqa: E731
  total = sum(int(np.prod(s.shape)) for s in shapes.values())
  matmul = total - size(("pos_embed",)) - (0 if config.tie_embeddings else
                                           size(("embed", "embedding")))
  attn = config.num_layers * seq_len * config.num_heads * config.head_dim
  return {"params": total, "matmul_params": matmul, "layers": config.num_layers,
          "flops_per_token": 6 * matmul + 6 * attn,
          "flops_per_token_noncausal": 6 * matmul + 12 * attn}


def mfu(tok_s, fpt, peak):
  return tok_s * fpt / peak if tok_s and fpt and peak else None


def run_jax(name, args, rt, flat, batches, warmup, steps, after=None):
  """decoder_jax's side on host weights `flat` (cast to the param dtype on the device)."""
  import jax
  from decoder_jax.model import Decoder

  def prepare(impl, batch, rng):
    config = model_config(name, args, batch["inputs"].shape[1], rt["compute_dtype"],
                          rt["param_dtype"], impl)
    params = jax.device_put(common.unflat({p: common.cast(v, rt["param_dtype"])
                                           for p, v in flat.items()}))
    state, compiled, info = common.compile_train_step(
        Decoder(config), common.train_state(params, args), {}, batch, rng,
        loss_chunk_size=args.loss_chunk or None)
    return state, {}, compiled, dict(info, remat=config.remat)
  b, t = batches[0]["inputs"].shape
  return common.jax_side({"model": name, "side": "jax", "batch": b, "seq_len": t,
                          "loss_chunk_size": args.loss_chunk or None}, prepare,
                         rt["jax_attention_resolved"], batches, args.seed, warmup, steps, after)


def trace_steps(args, name, compiled, state, dev, rng):
  """--trace_dir: a jax.profiler trace of --trace_steps more steps in TRACE_DIR/MODEL and
  decoder_jax.trace_account's split of their device time (ms per step by kind of work)."""
  import jax
  from decoder_jax import trace_account
  directory = os.path.join(os.path.abspath(args.trace_dir), name)
  try:
    with jax.profiler.trace(directory):
      for i in range(args.trace_steps):
        state, metrics = compiled(state, {}, dev[i % len(dev)], rng)
      jax.block_until_ready((state, metrics))
    acc = trace_account.account(directory)
  except Exception as e:  # pylint: disable=broad-except  # the timed steps must survive it
    traceback.print_exc()
    return {"trace_dir": directory, "trace_error": common.error_text(e)}
  print(f"  trace of {args.trace_steps} steps in {directory}:\n" + "\n".join(
      "    " + line for line in trace_account.format_table(acc, args.trace_steps, 8).splitlines()),
        flush=True)
  return {"trace_dir": directory, "trace_kind": acc.kind,
          "trace_ms_per_step": {k: v / 1e6 / args.trace_steps for k, v in
                                sorted(acc.by_category.items(), key=lambda kv: -kv[1])}}


def build_hf(config, args, rt, state=None):
  import torch
  if rt["torch_device"] == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = True  # as nanoGPT; only float32 matmuls
    torch.backends.cudnn.allow_tf32 = True
  return common.HfTrainer(config, args, rt["torch_device"],
                          "bfloat16" if rt["precision"] == "bfloat16" else "float32", state,
                          checkpointing=rt["hf_checkpointing"], compile=rt["torch_compile"],
                          autocast=rt["precision"] == "mixed")


def run_hf(name, build, batches, warmup, steps):
  b, t = batches[0]["inputs"].shape
  rec = common.hf_side({"model": name, "side": "hf", "batch": b, "seq_len": t}, build, batches,
                       warmup, steps)
  return dict(rec, compile_s=rec["first_step_s"] if rec["torch_compile"] else None)


def child_peak(args, framework):
  """The environment and the measured matmul peak in the compute dtype (torch's: reference):
  the median FLOP/s of `inner` back-to-back n^3 matmuls over --peak_reps timings."""
  rt = runtime(args)
  n, inner = args.peak_n or (8192 if rt["gpu"] else 1024), 10 if rt["gpu"] else 2

  def flops(matmul, sync):
    sync(matmul())
    times = []
    for _ in range(args.peak_reps):
      t = time.perf_counter()
      sync([matmul() for _ in range(inner)])
      times.append((time.perf_counter() - t) / inner)
    return 2 * n**3 / statistics.median(times)
  if framework == "jax":
    import jax
    import jax.numpy as jnp
    device = jax.devices()[0]
    a, b = (jax.random.normal(k, (n, n), jnp.dtype(rt["compute_dtype"]))
            for k in jax.random.split(jax.random.key(0)))
    mm = jax.jit(jnp.matmul)
    env = {**common.env_facts(("jax", "jaxlib") + DISTS), **rt, "remat": args.remat,
           "jax_device": getattr(device, "device_kind", str(device)),
           "loss_chunk": args.loss_chunk, "xla_flags": os.environ.get("XLA_FLAGS", "(unset)")}
    return common.dump(args._out, {"env": env, "peak": {  # pylint: disable=protected-access
        "n": n, "dtype": rt["compute_dtype"], "reps": args.peak_reps, "inner": inner,
        "jax_flops": flops(lambda: mm(a, b), jax.block_until_ready)}}, say=False)
  import torch
  cuda = torch.cuda.is_available()
  data = {"env": {"torch": torch.__version__, "torch_cuda_available": cuda}}
  if cuda:
    data["env"].update(torch_gpu=torch.cuda.get_device_name(0), torch_cuda=torch.version.cuda)
  if cuda or not rt["gpu"]:
    data["env"]["torch_threads"] = torch.get_num_threads()
    a, b = (torch.randn(n, n, device=rt["torch_device"], dtype=getattr(torch, rt["compute_dtype"]))
            for _ in range(2))
    data["torch_flops"] = flops(lambda: a @ b, (lambda _: torch.cuda.synchronize())
                                if rt["gpu"] else (lambda _: None))
  return common.dump(args._out, data, say=False)  # pylint: disable=protected-access


def child_model(args, side, name):
  """One side of one model: the same weights (decoder_jax's init on JAX's CPU backend, same
  seed) and batches in either side's process."""
  rt, (batch, seq_len) = runtime(args), shape_of(name, args)
  out = {"model": name, "batch": batch, "seq_len": seq_len, "results": [], "notes": [
      "--remat dots_saveable has no HF equivalent: HF runs without gradient checkpointing"]
      if args.remat == "dots_saveable" else []}
  t0 = time.perf_counter()
  config32 = model_config(name, args, seq_len)
  flat = common.init_params(config32, args.seed)
  out.update(model_facts(config32, seq_len))
  batches = common.random_batches(config32.vocab_size, batch, seq_len,
                                  min(args.warmup + args.steps, 4), args.seed + 2)
  print(f"  {MODELS[name]['label']}: {out['params']:,} params ({out['matmul_params']:,} in "
        f"matmuls), {config32.num_layers} layers, batch {batch} x {seq_len}, "
        f"{out['flops_per_token'] / 1e9:.3f} GFLOP/token; init {time.perf_counter() - t0:.1f} s",
        flush=True)
  common.dump(args._out, out, say=False)  # pylint: disable=protected-access  # if it dies
  try:
    if side == "hf":
      state = common.hf_state_dict(config32, flat)
      del flat
      rec = run_hf(name, lambda: build_hf(config32, args, rt, state), batches, args.warmup,
                   args.steps)
    else:
      after = (lambda *a: trace_steps(args, name, *a)) if args.trace_dir else None
      rec = run_jax(name, args, rt, flat, batches, args.warmup, args.steps, after)
    common.print_side(rec)
  except Exception as e:  # pylint: disable=broad-except
    traceback.print_exc()
    rec = {"model": name, "side": side, "batch": batch, "seq_len": seq_len,
           "error": ("OOM: " if common.is_oom(e) else "") + common.error_text(e)}
  out["results"].append(rec)
  common.dump(args._out, out, say=False)  # pylint: disable=protected-access


def find_max(try_fn, start, cap, step, deadline=None):
  """Largest batch b <= cap with try_fn(b)["ok"]: doubling from `start` (halving when it
  fails), then bisection until the first failing batch is within `step`."""
  tries, order, last = {}, [], {"s": 0.0, "stopped": None}

  def ok(b):
    if b not in tries:
      if deadline is not None and time.time() + 1.3 * last["s"] > deadline:
        last["stopped"] = f"time limit, before trying batch {b}"
        raise TimeoutError
      t = time.perf_counter()
      rec = tries[b] = dict(try_fn(b), batch=b)
      rec["try_s"] = last["s"] = time.perf_counter() - t
      order.append(rec)
      print(f"  batch {b}: {'ok' if rec['ok'] else 'failed'} ({rec['try_s']:.1f} s"
            f"{'; ' + rec['error'][:160] if rec.get('error') else ''})", flush=True)
    return tries[b]["ok"]
  lo, hi = 0, None
  try:
    b = max(1, min(start, cap))
    if ok(b):
      lo = b
      while lo < cap and hi is None:
        b = min(2 * lo, cap)
        lo, hi = (b, None) if ok(b) else (lo, b)
    else:
      hi = b
      while hi > 1:
        if ok(hi // 2):
          lo = hi // 2
          break
        hi //= 2
    while hi is not None and hi - lo > step:
      mid = (lo + hi) // 2
      if mid - mid % step > lo:  # round down to the precision where it stays above lo
        mid -= mid % step
      if not lo < mid < hi:
        break
      lo, hi = (mid, hi) if ok(mid) else (lo, mid)
  except TimeoutError:
    pass
  return {"max": lo, "first_fail": hi, "cap": cap, "capped": hi is None and lo >= cap,
          "stopped": last["stopped"], "tries": order}


def child_search(args, side, name):
  """find_max over batches, each try --search_steps steps: decoder_jax compiles a step per
  batch; HF keeps one model and optimizer (its own init), compiled with a dynamic batch."""
  rt, seq_len = runtime(args), shape_of(name, args)[1]
  cap = args.search_cap or (4096 if rt["gpu"] else 4)
  step = args.search_step or (8 if rt["gpu"] else 1)
  config32 = model_config(name, args, seq_len)
  out = {"model": name, "side": side, "seq_len": seq_len, **model_facts(config32, seq_len),
         "start": args.search_start, "cap": cap, "step": step,
         "search_steps": args.search_steps, "setup": {}}
  if side == "jax":
    out["loss_chunk_size"] = args.loss_chunk or None
    flat = common.init_params(config32, args.seed)
    run = lambda batches: run_jax(name, args, rt, flat, batches, 0, args.search_steps)  # noqa: E731
  else:
    hf = build_hf(config32, args, rt)
    hf.dynamic = out["setup"]["compiled"] = hf.compiled
    run = lambda batches: run_hf(name, lambda: hf, batches, 0, args.search_steps)  # noqa: E731
  print(f"  {SIDE_LABELS[side]} {name}: batch search at seq {seq_len}, from {args.search_start} "
        f"up to {cap}, precision {step}, {args.search_steps} steps per try"
        f"{'' if side == 'hf' else ', loss chunk ' + str(args.loss_chunk or 'off')}", flush=True)

  def try_fn(batch):
    try:
      rec = dict(run(common.random_batches(config32.vocab_size, batch, seq_len, 1,
                                           args.seed + batch)), ok=True)
    except Exception as e:  # pylint: disable=broad-except
      if not common.is_oom(e):
        raise
      rec = {"ok": False, "error": common.error_text(e)}
    if side == "hf":
      hf.opt.zero_grad(set_to_none=True)
    gc.collect()
    if rec.get("attention_fallback"):  # the fallback holds for the later tries
      out["setup"]["fallback"], rt["jax_attention_resolved"] = rec["attention_fallback"], "xla"
    return rec
  out.update(find_max(try_fn, args.search_start, cap, step, deadline=args._deadline))  # pylint: disable=protected-access
  common.dump(args._out, out, say=False)  # pylint: disable=protected-access


class Runner:
  """Starts the children (each in a process group of its own) within the time limit."""

  def __init__(self, args, argv):
    self.args, self.argv, self.gpu = args, list(argv), None  # gpu: known after peak:jax
    self.dir = tempfile.mkdtemp(prefix="train_speed_")
    self.deadline = time.time() + args.time_limit_s if args.time_limit_s else None

  def run(self, kind, share=1.0, extra_env=None, reserve=5.0):
    """(status, data) of child `kind`; share: the fraction of the time left it may use."""
    out = os.path.join(self.dir, kind.replace(":", "_") + ".json")
    cmd = [sys.executable, os.path.abspath(__file__), *self.argv, "--_child", kind, "--_out", out]
    timeout = None
    if self.deadline is not None:
      left = self.deadline - time.time() - reserve
      if left < 20:
        return "skipped (time limit)", None
      timeout = max(left * share, min(60.0, left))  # at least a minute, or what is left
      cmd += ["--_deadline", f"{time.time() + timeout - 3:.1f}"]
    cmd += [] if self.gpu is None else ["--_gpu", str(int(self.gpu))]
    env = dict(os.environ, **(extra_env or {}))
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{self.args.jax_mem_fraction:g}")
    if ":hf:" in f":{kind}:" or kind == "peak:torch":
      env["JAX_PLATFORMS"] = "cpu"  # JAX only initialises weights there: no 2nd CUDA client
    elif not self.args.no_launch_flags:
      xla_flags.apply_launch_flags(env)  # what `python -m decoder_jax.train` sets
    status = common.run(cmd, env=env, timeout=timeout, cwd=os.getcwd())["status"]
    if not os.path.exists(out):
      return status, None
    with open(out) as f:
      return status, json.load(f)

  def each(self, kind, names, title):
    """(name, side, status, data) of child kind:side:name for each model and side asked."""
    todo = [(n, s) for n in names for s in SIDES if s in self.args.sides]
    for i, (name, side) in enumerate(todo):
      print(f"\n## {title(name, side)}", flush=True)
      extra = {"PYTORCH_CUDA_ALLOC_CONF": os.environ.get(
          "PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")} \
          if kind == "search" and side == "hf" else None
      status, data = self.run(f"{kind}:{side}:{name}", share=1.0 / (len(todo) - i),
                              extra_env=extra)
      if status != "ok":
        print(f"  {'search ' if kind == 'search' else ''}{name} {side}: child {status}",
              flush=True)
      yield name, side, status, data


def _interrupt(signum, frame):
  raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  if args._child:  # pylint: disable=protected-access
    kind, _, rest = args._child.partition(":")  # pylint: disable=protected-access
    return child_peak(args, rest) if kind == "peak" else (
        child_model if kind == "model" else child_search)(args, *rest.split(":"))
  runner = Runner(args, argv)
  # SIGTERM (e.g. from tools/gpu_checks.py at its time cap) ends the running child too.
  signal.signal(signal.SIGTERM, _interrupt)
  try:
    return parent(args, runner, common.command_line("train_speed.py", argv))
  finally:
    shutil.rmtree(runner.dir, ignore_errors=True)  # the children's JSON, merged into --json_out


def parent(args, runner, command):
  print(f"# pretraining step benchmark: models {args.models or 'none'}, sides {args.sides}"
        f"{', max batch search ' + ','.join(args.search_models) if args.max_batch_search else ''}"
        f"; time limit {args.time_limit_s or 'none'} s\n\n## environment and matmul peak",
        flush=True)
  status, data = runner.run("peak:jax", reserve=0)
  if data is None:
    raise SystemExit(f"the JAX environment / matmul peak child failed ({status})")
  env, peak = data["env"], data["peak"]
  runner.gpu = env["gpu"]
  if "hf" in args.sides:
    status, data = runner.run("peak:torch", reserve=0)
    if data is None:
      raise SystemExit(f"the torch environment child failed ({status})")
    env.update(data["env"])
    peak["torch_flops"] = data.get("torch_flops")
  env["command"] = command
  print("\n".join(f"  {k}: {v}" for k, v in env.items()))
  print(f"  matmul peak ({peak['n']}^3 {peak['dtype']}, median of {peak['reps']}): jax "
        f"{_flops(peak['jax_flops'])}" + (f", torch {_flops(peak['torch_flops'])}"
                                          if peak.get("torch_flops") else ""), flush=True)
  if "hf" in args.sides and env["gpu"] and not env.get("torch_cuda_available"):
    raise SystemExit(f"ABORT: JAX runs on the GPU but torch {env['torch']} has no CUDA: the HF "
                     "rows would run elsewhere. Install a CUDA torch or pass --sides jax.")
  models, searches, notes = {}, {}, []
  for name, side, status, data in runner.each(
      "model", args.models, lambda n, s: f"{n}: {MODELS[n]['label']}, {SIDE_LABELS[s]}"):
    batch, seq_len = shape_of(name, args)
    m = models.setdefault(name, {"model": name, "batch": batch, "seq_len": seq_len,
                                 "by_side": {}, "status": {}})
    m["status"][side], data = status, data or {}
    m.update({k: v for k, v in data.items() if k not in ("results", "notes")})
    for r in data.get("results", []):
      if "error" not in r:
        r["mfu"] = mfu(r["tok_per_s"], m.get("flops_per_token"), peak["jax_flops"])
      m["by_side"][side] = r
    notes += [n for n in data.get("notes", []) if n not in notes]
  if args.max_batch_search and not env["gpu"] and not args.force_search:
    notes.append("max batch search skipped: not a GPU run (--force_search with a small "
                 "--search_cap runs it on CPU)")
  elif args.max_batch_search:
    for name, side, status, data in runner.each(
        "search", args.search_models, lambda n, s: f"max batch search: {n}, {SIDE_LABELS[s]}"):
      s = searches.setdefault(name, {"seq_len": shape_of(name, args)[1]})
      s[f"{side}_status"] = status
      if data is not None and "max" in data:
        best = _best_try(data)
        if best:
          data["mfu"] = mfu(data["max"] * data["seq_len"] / best["step_s"][-1],
                            data["flops_per_token"], peak["jax_flops"])
        s[side] = data
        if data.get("setup", {}).get("fallback"):
          notes.append(f"{name} search: decoder_jax attention fell back to xla "
                       f"({data['setup']['fallback'][:120]})")
  for m in models.values():
    j, h = m["by_side"].get("jax") or {}, m["by_side"].get("hf") or {}
    if j.get("attention_fallback"):
      notes.append(f"{m['model']}: decoder_jax attention fell back to xla "
                   f"({j['attention_fallback'][:120]})")
    if h.get("torch_compile_error"):
      notes.append(f"{m['model']}: torch.compile failed, HF ran eager "
                   f"({h['torch_compile_error'][:120]})")
  lines = summary_lines(models, searches, env, peak, args) + [f"- note: {n}" for n in notes]
  print("\n## summary\n" + "\n".join(lines))
  if args.json_out:
    common.dump(args.json_out, {"env": env, "peak": peak, "args": vars(args), "models": models,
                                "searches": searches, "summary": lines})
  print(f"\n## results ({header_line(env, args)})\n\n" + "\n".join(
      table_lines(models, searches, env)))
  return 2 if any(m.get("mismatch") for m in models.values()) else 0


def _best_try(search):
  return next((t for t in search["tries"] if t["batch"] == search["max"] and t["ok"]), None)


def _flops(x):
  return f"{x / 1e12:.1f} TFLOP/s" if x >= 1e12 else f"{x / 1e9:.1f} GFLOP/s"


def _bound(s):
  if s is None:
    return "-"
  if s.get("capped"):
    return f">= {s['max']} (cap)"
  return (str(s["max"]) + (f" ({s['first_fail']} fails)" if s.get("first_fail") else "")
          + (f" [stopped: {s['stopped']}]" if s.get("stopped") else ""))


def summary_lines(models, searches, env, peak, args):
  fmt, pct, peak_flops = common.fmt_bytes, common.pct, peak.get("jax_flops")
  lines = [f"- MFU = tokens/s x (6 N + 6 L T d) / measured peak; N = parameters in matmuls "
           f"(all but GPT-2's position table; tied embeddings counted once, as the output "
           f"projection), L layers, T sequence, d = heads x head_dim (causal attention). "
           f"Peak: jnp.matmul {peak.get('n')}^3 {peak.get('dtype')} median "
           f"{_flops(peak_flops)}" + (f" (torch.matmul: {_flops(peak['torch_flops'])})"
                                      if peak.get("torch_flops") else "")]
  for name, m in models.items():
    j, h = (r if r and "error" not in r else None for r in map(m["by_side"].get, SIDES))
    if j and h:
      ratio = j["tok_per_s"] / h["tok_per_s"]
      line = (f"- {name}: decoder_jax / HF tokens/s = **{ratio:.2f}x** ({j['tok_per_s']:,.0f} "
              f"vs {h['tok_per_s']:,.0f}; MFU {pct(j.get('mfu'))} vs {pct(h.get('mfu'))}; "
              f"peak memory {fmt(j['peak_bytes'])} vs {fmt(h['peak_bytes'])})")
      if name in SPEED_TARGETS:
        line += (f"; target >= {SPEED_TARGETS[name]}x on an H200: "
                 f"{common.verdict(ratio >= SPEED_TARGETS[name], env)}")
      diff, float32 = abs(j["loss_first"] - h["loss_first"]), env.get("precision") == "float32"
      tol = args.loss_tol if float32 else common.BF16_WARN
      lines += [line, f"- {name} cross-check: step-0 loss decoder_jax {j['loss_first']:.6f} vs "
                f"HF {h['loss_first']:.6f}, |diff| {diff:.1e} ({'ok' if diff <= tol else 'MISMATCH'}"
                f", tol {tol:g}, same weights and batch, {env.get('precision')}); last step "
                f"{j['loss_last']:.4f} vs {h['loss_last']:.4f}"]
      m["mismatch"] = diff > tol and float32
    if name == "gpt2" and h:
      lines.append(f"- gpt2: this run's HF peer {h['tok_per_s']:,.0f} tok/s against nanoGPT's "
                   f"{NANOGPT_TOK_S:,.0f} on an H200 (the issue's figure)"
                   + (f"; decoder_jax {j['tok_per_s']:,.0f} = "
                      f"{j['tok_per_s'] / NANOGPT_TOK_S:.2f}x that figure" if j else ""))
    if name == "gpt2" and j and peak_flops:
      noncausal = mfu(j["tok_per_s"], m["flops_per_token_noncausal"], peak_flops)
      lines.append("- gpt2 decoder_jax MFU with nanoGPT's non-causal attention count "
                   f"(6 N + 12 L T d): {pct(noncausal)}")
    if name in MFU_TARGET and j:
      lines.append(f"- {name}: decoder_jax MFU **{pct(j.get('mfu'))}** (target >= "
                   f"{MFU_TARGET[name]:.0%} of the measured peak on an H200: "
                   f"{common.verdict((j.get('mfu') or 0) >= MFU_TARGET[name], env)}); "
                   f"{m['params']:,} params, {m['flops_per_token'] / 1e9:.2f} GFLOP/token")
    if j and j.get("trace_ms_per_step"):
      from decoder_jax import trace_account
      lines.append(f"- {name} decoder_jax step by kind of work ({j['trace_kind']} trace of "
                   f"{args.trace_steps} steps, {j['trace_dir']}): "
                   + trace_account.split_text(j["trace_ms_per_step"]))
  for name, s in searches.items():
    j, h = s.get("jax"), s.get("hf")
    if j and h and j.get("max") and h.get("max"):
      lines.append(f"- {name} max batch at seq {j['seq_len']}: decoder_jax **{_bound(j)}** vs "
                   f"HF **{_bound(h)}** = {j['max'] / h['max']:.2f}x (decoder_jax "
                   f"{j['max'] - h['max']:+d} sequences; target: decoder_jax larger on one "
                   f"H200: {common.verdict(j['max'] > h['max'] and not h.get('capped'), env)}; "
                   f"loss chunk {j.get('loss_chunk_size') or 'off'}, remat {args.remat})")
    elif j or h:
      lines.append(f"- {name} max batch: decoder_jax {_bound(j)}, HF {_bound(h)}")
  return lines


def table_lines(models, searches, env):
  fmt, pct, rows = common.fmt_bytes, common.pct, []
  label = lambda name, layers: MODELS[name]["label"] + (  # noqa: E731
      f" ({layers} layer{'s' if layers != 1 else ''})"
      if layers and layers != MODELS[name]["layers"] else "")
  for name, m in models.items():
    for side in SIDES:
      r = m["by_side"].get(side)
      head = [label(name, m.get("layers")), SIDE_LABELS[side] + (
          " (compiled)" if side == "hf" and r and r.get("torch_compile") else ""),
              f"{m['batch']} x {m['seq_len']}"]
      if r is None and side in m["status"]:
        rows.append(head + ["no result" if m["status"][side] == "ok" else m["status"][side]])
      elif r is not None and "error" in r:
        rows.append(head + [f"failed: {r['error'][:120]}"])
      elif r is not None:
        rows.append(head + [
            f"{r['ms_per_step']:.1f}", f"{r['tok_per_s']:,.0f}", pct(r.get("mfu")),
            fmt(r["peak_bytes"]), f"{r['trace_s']:.1f} + {r['compile_s']:.1f}" if side == "jax"
            else f"{r['compile_s']:.1f} (1st step)" if r.get("compile_s") is not None else "-",
            f"{r['loss_first']:.4f} -> {r['loss_last']:.4f}",
            common.busy_cells([r.get("others_busy")])])
  for name, s in searches.items():
    for side in SIDES:
      r = s.get(side)
      head = [label(name, (r or {}).get("layers")) + ": max batch", SIDE_LABELS[side]]
      best = _best_try(r) if r and "max" in r else None
      if r is None or "max" not in r:
        rows.append(head + [f"? x {s['seq_len']}", s.get(f"{side}_status", "not run")])
      elif best is None:
        rows.append(head + [f"{_bound(r)} x {r['seq_len']}", "no batch trained"])
      else:
        step_s = best["step_s"][-1]
        rows.append(head + [
            f"**{_bound(r)}** x {r['seq_len']}", f"{step_s * 1e3:.1f} (last of "
            f"{len(best['step_s'])})", f"{r['max'] * r['seq_len'] / step_s:,.0f}",
            pct(r.get("mfu")), f"~{fmt(best.get('xla_estimate_bytes'))} (XLA plan)"
            if side == "jax" else fmt(best.get("peak_bytes")),
            f"{best['trace_s']:.1f} + {best['compile_s']:.1f}" if side == "jax" else "-",
            f"{best['losses'][0]:.4f} -> {best['losses'][-1]:.4f}", "-"])
  mem = "peak device memory" if env.get("gpu") else "peak RSS growth"
  return common.md_table(["model", "side", "batch x seq", "ms/step (median)", "tokens/s", "MFU",
                          mem, "compile s", "loss step 0 -> last", "others busy"], rows,
                         right=(3, 4, 5, 6, 7, 9))


def header_line(env, args):
  hw = (f"{env.get('jax_device')} (torch: {env.get('torch_gpu', '-')}, CUDA "
        f"{env.get('torch_cuda', '-')})" if env.get("gpu") else
        f"{env.get('cpu')}, {env.get('cores')} cores (CPU)")
  versions = [f"python {env.get('python')}", f"jax/jaxlib {env.get('jax')}/{env.get('jaxlib')}",
              *(f"{d} {env.get(d)}" for d in DISTS), *(f"{p} {env[p]}" for p in common.PLUGINS
                                                        if p in env)]
  return (f"Hardware: {hw}. Versions: {', '.join(versions)}. Precision {env.get('precision')}, "
          f"median of {args.steps} timed steps after {args.warmup} warm-up, decoder_jax "
          f"attention {env.get('jax_attention')} ({env.get('jax_attention_resolved')}), "
          f"scan_layers, remat {args.remat}, loss chunk {args.loss_chunk or 'off'}; HF SDPA, "
          f"torch.compile {'on' if env.get('torch_compile') else 'off'}; AdamW lr {args.lr:g}, "
          f"wd {args.weight_decay:g}, clip {args.grad_clip:g}; random tokens.")


def parse_args(argv=None):
  def per_model(text):  # '16' or 'gpt2=16,llama1b=8'
    if "=" not in text:
      return int(text)
    pairs = [(n.strip(), int(v)) for n, _, v in (p.partition("=") for p in text.split(","))]
    if any(n not in MODELS for n, _ in pairs):
      raise argparse.ArgumentTypeError(f"unknown model in {text!r}")
    return dict(pairs)

  def names(allowed):
    def parse(text):
      got = [x.strip() for x in text.split(",") if x.strip() and x.strip() != "none"]
      if any(n not in allowed for n in got):
        raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)} or none")
      return got
    return parse
  defaults = lambda key: ", ".join(f"{n} {s[key]}" for n, s in MODELS.items())  # noqa: E731
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  add = ap.add_argument
  add("--models", default="gpt2,smollm2,llama1b", type=names(tuple(MODELS)),
      help=f"comma list of {', '.join(MODELS)}, or none")
  add("--sides", default="jax,hf", type=names(SIDES))
  add("--no_launch_flags", action="store_true",
      help="decoder_jax without the XLA flags the train launcher adds (decoder_jax/xla_flags.py)")
  add("--batch", type=per_model, default=None,
      help=f"batch of every model, or per model: gpt2=16,llama1b=8 ({defaults('batch')})")
  add("--seq_len", type=per_model, default=None,
      help=f"sequence length, as --batch ({defaults('seq_len')})")
  add("--precision", default="auto", choices=("auto", "mixed", "bfloat16", "float32"),
      help="auto: mixed on a GPU (float32 params, bf16 compute), float32 on CPU")
  add("--remat", default="none", choices=("none", "dots_saveable", "full"),
      help="decoder_jax remat policy; full also turns on HF gradient checkpointing")
  add("--loss_chunk", type=int, default=0, help="make_train_step(loss_chunk_size=N) (0: off)")
  common.add_step_flags(ap, lr=6e-4, weight_decay=0.1)
  add("--trace_dir", default=None, help="trace --trace_steps more steps of each decoder_jax "
      "side into TRACE_DIR/MODEL and split their device time (decoder_jax.trace_account)")
  add("--trace_steps", type=int, default=3)
  add("--max_batch_search", action="store_true")
  add("--force_search", action="store_true", help="run the search on CPU too")
  add("--search_models", default="gpt2", type=names(tuple(MODELS)))
  add("--search_start", type=int, default=16)
  add("--search_cap", type=int, default=0, help="0: 4096 on a GPU, 4 on CPU")
  add("--search_step", type=int, default=0, help="bisection precision (0: 8 GPU, 1 CPU)")
  add("--search_steps", type=int, default=2, help="training steps per try")
  add("--peak_n", type=int, default=0, help="matmul size (0: 8192 GPU, 1024 CPU)")
  add("--peak_reps", type=int, default=5)
  add("--jax_mem_fraction", type=float, default=0.95,
      help="XLA_PYTHON_CLIENT_MEM_FRACTION of the children (unless set)")
  add("--time_limit_s", type=float, default=460, help="whole-run limit in seconds (0: none)")
  for hidden, kind in (("--_child", str), ("--_out", str), ("--_deadline", float),
                       ("--_gpu", int)):
    add(hidden, type=kind, default=None, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  sizes = [v for x in (args.batch, args.seq_len) if x
           for v in (x.values() if isinstance(x, dict) else [x])]
  if (args.steps < 1 or args.warmup < 0 or not args.sides or args.search_steps < 1
      or args.search_start < 1 or any(v < 1 for v in sizes)):
    ap.error("need --steps >= 1, --warmup >= 0, some --sides, --search_steps >= 1, "
             "--search_start >= 1, positive --batch and --seq_len")
  searched = set(args.search_models) if args.max_batch_search else set()
  if "gpt2" in set(args.models) | searched and shape_of("gpt2", args)[1] > 1024:
    ap.error("--seq_len: GPT-2's learned position table has 1024 positions")
  if not args.models and not args.max_batch_search:
    ap.error("nothing to run: --models none without --max_batch_search")
  return args

if __name__ == "__main__":
  sys.exit(main())
