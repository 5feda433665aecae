"""Pretraining step throughput, side by side: decoder_jax vs. Hugging Face transformers.

Full training steps (forward, backward, global-norm clip 1.0, AdamW lr 6e-4, betas
0.9/0.999, eps 1e-8, weight decay 0.1 on matrices and embeddings only, constant lr) on
random token batches (fixed seed, next-token cross-entropy on every position), for:

  gpt2     GPT-2 124M: preset("gpt2-small") (12 layers, width 768, 12 heads, vocabulary
           50,304 as in nanoGPT, tied embeddings), batch 16 x 1024.
           Peer: transformers GPT2LMHeadModel.
  smollm2  the SmolLM2-135M architecture: preset("smollm2-135m") (30 layers, width 576,
           9 query / 3 key-value heads, SwiGLU 1536, vocabulary 49,152, tied), 32 x 512.
           Peer: transformers LlamaForCausalLM.
  llama1b  the Llama-3.2-1B architecture: 16 layers, width 2048, 32 query / 8 key-value
           heads (head_dim 64), SwiGLU 8192, vocabulary 128,256, tied embeddings, RoPE theta
           500,000 without Llama 3's rope scaling: 1,235,814,400 parameters (973,146,112
           without the embedding). Sequence 2048, batch 8 by default (--batch llama1b=N;
           --max_batch_search --search_models llama1b finds the largest).
           Peer: transformers LlamaForCausalLM.

Sides, same architecture and the same weights (decoder_jax's float32 random init, copied
into the HF model through decoder_jax.interop.hf's tensor map):
  decoder_jax  Decoder(config, scan_layers=True, attention_impl --jax_attention ("auto":
               cuDNN on a GPU, XLA on CPU; a failing cuDNN compile falls back to "xla"),
               remat --remat), train.steps.make_train_step under jax.jit (state donated,
               compiled ahead of time: trace and XLA compile seconds apart), with
               loss_chunk_size=--loss_chunk where this checkout's make_train_step has it.
  HF           GPT2LMHeadModel / LlamaForCausalLM, attn_implementation="sdpa", loss from
               the model (labels + shift_labels: every position, as decoder_jax), fused
               torch AdamW on CUDA (two groups: weight decay on tensors of rank >= 2),
               clip_grad_norm_, torch.compile(model) (--torch_compile, default on with
               CUDA), gradient checkpointing only with --remat full.

Precision (--precision): "mixed" (the default on a GPU): float32 parameters, gradients and
Adam moments, bfloat16 compute (decoder_jax: dtype bfloat16, param_dtype float32; HF:
float32 weights under torch.autocast(bfloat16), as nanoGPT trains). "bfloat16": bfloat16
parameters and compute on both sides. "float32" (the default on CPU): float32 everywhere.

Per side: median ms per step of --steps timed steps after --warmup steps (each step timed
alone: jax.block_until_ready on state and metrics; torch.cuda.synchronize), tokens/s =
batch * seq_len / median, MFU, peak memory (GPU: jax peak_bytes_in_use, torch
max_memory_allocated; CPU: the peak-RSS growth over the side), compile seconds (decoder_jax:
trace + XLA compile; HF: the first step, torch.compile included), step-0 and last losses.

MFU = tokens/s * FLOPs per token / measured peak FLOP/s, with
  FLOPs per token = 6 * N + 6 * L * T * d
N: every parameter that takes part in a matmul, i.e. all of them except GPT-2's learned
position table (with tied embeddings the token table is the output projection; norm
scales and biases, under 0.1%, are counted); 6 * L * T * d: causal attention (QK^T and
PV, forward and backward, each query attending to T/2 keys on average) for L layers,
sequence T, d = query heads * head_dim. (nanoGPT's estimate_mfu counts 12 * L * T * d,
non-causal; the summary gives that figure for GPT-2 too.) The peak is measured in the same
run: the median over --peak_reps of a jitted jnp matmul of two --peak_n squared matrices
(8192 on a GPU, 1024 on CPU) in the compute dtype (bfloat16 on a GPU unless --precision
float32; float32 on CPU). torch.matmul's peak is measured alongside for reference.

Every side of every model runs in a child process of its own, so each has the whole device
(JAX's peak_bytes_in_use, which cannot be reset, is that side's own, and JAX's allocator,
which keeps what it grew to, never holds memory torch needs). The decoder_jax children never
import torch; the HF children run with JAX_PLATFORMS=cpu (JAX only initialises the weights
there), so no process holds two CUDA clients or two cuDNN builds. Both init the same
weights from the same seed on JAX's CPU backend. JAX children get
XLA_PYTHON_CLIENT_PREALLOCATE=false and XLA_PYTHON_CLIENT_MEM_FRACTION=--jax_mem_fraction
(0.95; JAX's default 0.75 would cap it well below torch) unless the environment sets them.

--max_batch_search: for --search_models (gpt2) at their sequence length, the largest batch
with which --search_steps (2) training steps succeed, for each side in its own process:
doubling from --search_start (16) up to --search_cap, then bisection to --search_step (8),
catching out-of-memory errors (jax RESOURCE_EXHAUSTED, torch.cuda.OutOfMemoryError). The
HF side compiles once (batch marked dynamic) and runs with PYTORCH_CUDA_ALLOC_CONF=
expandable_segments:True (unless set). Skipped on CPU unless --force_search (use a tiny
--search_cap there). The search rows of the table give each side's maximum, the step time
at that batch, and its memory (decoder_jax: XLA's compile-time estimate, marked ~).

--time_limit_s (460): children get what is left of it (a child still running at the end is
killed, its finished sides kept; a search stops bisecting when the next try would not fit),
so the run ends with its table in time.

  python benchmarks/train_speed.py --models gpt2,smollm2 --table_out benchmarks/RESULTS.md
  python benchmarks/train_speed.py --models llama1b --table_out benchmarks/RESULTS.md
  python benchmarks/train_speed.py --models none --max_batch_search --loss_chunk 8192
  python benchmarks/train_speed.py --models gpt2,smollm2 --num_layers 2 --batch 2 \\
      --seq_len 64 --steps 2 --warmup 1                                      # CPU smoke run
"""

from __future__ import annotations

import argparse
import datetime
import gc
import inspect
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import types

# Set before jax is imported, in this process and (through the environment) the children.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import finetune as ft  # pylint: disable=wrong-import-position
from decoder_jax import xla_flags  # pylint: disable=wrong-import-position

LLAMA_1B = dict(family="llama", vocab_size=128256, num_layers=16, num_heads=32, num_kv_heads=8,
                width=2048, mlp_width=8192, max_length=2048, use_bias=False,
                tie_embeddings=True, rope_theta=500000.0, norm_eps=1e-5)
MODELS = {
    "gpt2": dict(label="GPT-2 124M", preset="gpt2-small", fields=None, batch=16, seq_len=1024),
    "smollm2": dict(label="SmolLM2-135M arch.", preset="smollm2-135m", fields=None, batch=32,
                    seq_len=512),
    "llama1b": dict(label="Llama-3.2-1B arch.", preset=None, fields=LLAMA_1B, batch=8,
                    seq_len=2048),
}
SIDES = ("jax", "hf")
SIDE_LABELS = {"jax": "decoder_jax", "hf": "HF transformers"}
# Targets on an H200 (bf16), from the issue.
SPEED_TARGETS = {"gpt2": 1.2, "smollm2": 1.3}  # decoder_jax / HF tokens per second
MFU_TARGET = {"llama1b": 0.55}
NANOGPT_TOK_S = 480e3  # nanoGPT GPT-2 124M on an H200 (the figure)
BF16_WARN = 0.05


# ---------------------------------------------------------------------------------------
# Configuration


def shape_of(name, args):
  """(batch, seq_len) of a model, after --batch / --seq_len overrides."""
  spec = MODELS[name]
  return (_pick(args.batch, name, spec["batch"]), _pick(args.seq_len, name, spec["seq_len"]))


def _pick(value, name, default):
  if value is None:
    return default
  if isinstance(value, int):
    return value
  return value.get(name, default)


def remat_field(requested):
  """(value for ModelConfig.remat, note or None), for this checkout's ModelConfig."""
  from decoder_jax.model import config as config_lib
  policies = tuple(getattr(config_lib, "REMAT_POLICIES", ()))
  if policies:  # string policies
    if requested in policies:
      return requested, None
    return "none", (f"--remat {requested} is not one of this checkout's REMAT_POLICIES "
                    f"{policies}: decoder_jax runs without remat")
  if requested == "dots_saveable":  # ModelConfig.remat is still a bool
    return False, ("--remat dots_saveable: this checkout's ModelConfig.remat is a bool (no "
                   "policies): decoder_jax runs without remat")
  return requested == "full", None


def loss_chunk_kwargs(chunk):
  """(kwargs for make_train_step, note or None)."""
  if not chunk:
    return {}, None
  from decoder_jax.train import steps as steps_lib
  if "loss_chunk_size" in inspect.signature(steps_lib.make_train_step).parameters:
    return {"loss_chunk_size": chunk}, None
  return {}, (f"--loss_chunk {chunk}: this checkout's make_train_step has no loss_chunk_size; "
              "decoder_jax computes the loss unchunked")


def model_config(name, args, seq_len, *, dtype, param_dtype, attention_impl):
  from decoder_jax.model import ModelConfig, preset
  spec = MODELS[name]
  overrides = dict(dtype=dtype, param_dtype=param_dtype, scan_layers=True, dropout=0.0,
                   attention_impl=attention_impl, remat=remat_field(args.remat)[0])
  if args.num_layers:
    overrides["num_layers"] = args.num_layers
  if spec["preset"]:
    config = preset(spec["preset"], **overrides)
  else:
    config = ModelConfig.from_dict({**spec["fields"], **overrides})
  if config.use_rope and seq_len > config.max_length:
    config = ModelConfig.from_dict({**config.to_dict(), "max_length": seq_len,
                                    "lora": None})
  if seq_len > config.max_length:
    raise SystemExit(f"{name}: --seq_len {seq_len} exceeds the learned position table "
                     f"({config.max_length})")
  return config


def runtime(args):
  """Backend-dependent settings, the same in every child."""
  if args._gpu is None:  # pylint: disable=protected-access
    import jax
    backend = jax.default_backend()
  else:  # set by the parent (HF children run JAX on the CPU only)
    backend = "gpu" if args._gpu else "cpu"  # pylint: disable=protected-access
  gpu = backend == "gpu"
  precision = args.precision if args.precision != "auto" else ("mixed" if gpu else "float32")
  return {
      "jax_backend": backend, "gpu": gpu, "precision": precision,
      "compute_dtype": "float32" if precision == "float32" else "bfloat16",
      "param_dtype": "bfloat16" if precision == "bfloat16" else "float32",
      "jax_attention": args.jax_attention,
      "jax_attention_resolved": (("cudnn" if gpu else "xla") if args.jax_attention == "auto"
                                 else args.jax_attention),
      "torch_device": "cuda" if gpu else "cpu",
      "torch_compile": gpu if args.torch_compile is None else args.torch_compile,
      "hf_checkpointing": args.remat == "full",
  }


def param_counts(config, flat_shapes):
  """(all parameters, those in matmuls: without GPT-2's position table or an untied input
  embedding)."""
  total = sum(int(np.prod(s.shape)) for s in flat_shapes.values())
  skip = flat_shapes[("pos_embed",)].shape if ("pos_embed",) in flat_shapes else ()
  matmul = total - (int(np.prod(skip)) if skip else 0)
  if not config.tie_embeddings:
    matmul -= int(np.prod(flat_shapes[("embed", "embedding")].shape))
  return total, matmul


def flops_per_token(config, seq_len, n_matmul):
  d = config.num_heads * config.head_dim
  return {"flops_per_token": 6 * n_matmul + 6 * config.num_layers * seq_len * d,
          "flops_per_token_noncausal": 6 * n_matmul + 12 * config.num_layers * seq_len * d}


# ---------------------------------------------------------------------------------------
# Weights and batches


def init_weights(config, seed):
  """decoder_jax's random init, float32 numpy {flat path: array} (scanned layout), made on
  JAX's CPU backend so the device's memory statistics start with the timed side."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from decoder_jax.model import Decoder
  with jax.default_device(jax.devices("cpu")[0]):
    init = jax.jit(lambda k: nn.unbox(Decoder(config).init(
        k, jnp.zeros((1, 8), jnp.int32))["params"]))
    params = jax.device_get(init(jax.random.key(seed)))
  return {p: np.asarray(v) for p, v in ft.flat(params).items()}  # pylint: disable=protected-access


def hf_state_dict(config, flat):
  """{HF name: float32 numpy} of `flat`, fused tensors (GPT-2's c_attn) assembled."""
  from decoder_jax.interop import hf as hf_interop
  links = hf_interop.tensor_links(config)
  where = hf_interop.unscanned_leaves(config, flat)
  hf_interop.check_links_cover(config, links, where)
  parts = {}
  for link in links:
    path, layer = where[link.ours]
    leaf = flat[path] if layer is None else flat[path][layer]
    parts.setdefault(link.hf, []).append((link.part or (0, 0), link.to_hf(leaf)))
  state = {}
  for name, pieces in parts.items():
    pieces = [t for _, t in sorted(pieces, key=lambda x: x[0])]
    value = np.concatenate(pieces, axis=-1) if len(pieces) > 1 else pieces[0]
    state[name] = np.array(value, dtype=np.float32, order="C", copy=True)  # writable
  return state


def hf_model_class(config):
  """(HF config object, model class) of `config`'s architecture, SDPA attention."""
  import transformers
  if config.family == "gpt2":
    from decoder_jax.interop import hf as hf_interop
    values = hf_interop.config_to_hf(config)
    values["use_cache"] = False
    return (transformers.GPT2Config.from_dict(values, attn_implementation="sdpa"),
            transformers.GPT2LMHeadModel)
  return (ft.hf_config(types.SimpleNamespace(base_config=config)),
          transformers.LlamaForCausalLM)


def load_weights(model, state):
  import torch
  own = model.state_dict()
  tied = (model.get_output_embeddings().weight.data_ptr()
          == model.get_input_embeddings().weight.data_ptr())
  missing = [k for k in own if k not in state and not (tied and k == "lm_head.weight")]
  unknown = [k for k in state if k not in own]
  if missing or unknown or not tied:
    raise RuntimeError(f"HF state dict mismatch: missing {missing[:5]}, unknown "
                       f"{unknown[:5]}, lm_head tied: {tied}")
  with torch.no_grad():
    for k, v in state.items():
      if tuple(own[k].shape) != v.shape:
        raise RuntimeError(f"{k}: HF shape {tuple(own[k].shape)} vs ours {v.shape}")
      own[k].copy_(torch.from_numpy(v))


def make_batches(vocab, batch, seq_len, n, seed):
  rs = np.random.RandomState(seed)
  tokens = rs.randint(0, vocab, size=(n, batch, seq_len + 1))
  return [{"inputs": t[:, :-1].astype(np.int32), "targets": t[:, 1:].astype(np.int32)}
          for t in tokens]


# ---------------------------------------------------------------------------------------
# Hugging Face side


def build_hf(config, args, rt, state=None):
  """The HF model on the device (weights from `state`, else HF's own init), its optimizer,
  and step(inputs, targets) -> loss of one full training step."""
  import torch
  device = torch.device(rt["torch_device"])
  cuda = device.type == "cuda"
  if cuda:
    torch.backends.cuda.matmul.allow_tf32 = True  # as nanoGPT; only float32 matmuls
    torch.backends.cudnn.allow_tf32 = True
  hf_cfg, cls = hf_model_class(config)
  torch.manual_seed(args.seed)
  with torch.device(device):
    model = cls(hf_cfg)
  model.to(dtype=torch.bfloat16 if rt["precision"] == "bfloat16" else torch.float32)
  if state is not None:
    load_weights(model, state)
  if rt["hf_checkpointing"]:
    ft.enable_checkpointing(model)  # pylint: disable=protected-access
  model.train()
  params = list(model.parameters())
  groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
  opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                          fused=True if cuda else None)
  autocast = rt["precision"] == "mixed"
  hf = types.SimpleNamespace(model=model, opt=opt, params=params, cuda=cuda, device=device,
                             forward=model, compiled=False,
                             attn=getattr(model.config, "_attn_implementation", None),
                             optimizer="AdamW fused" if cuda else "AdamW (foreach default)")
  if rt["torch_compile"]:
    hf.forward = torch.compile(model, mode=args.torch_compile_mode)
    hf.compiled = True

  def step(inputs, targets):
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
      out = hf.forward(input_ids=inputs, labels=targets, shift_labels=targets,
                       use_cache=False)  # shift_labels: no shift, every position
    out.loss.backward()
    if args.grad_clip > 0:
      torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out.loss.detach()

  hf.step = step
  hf.sync = torch.cuda.synchronize if cuda else (lambda: None)
  return hf


def run_hf(name, args, rt, config, state, batches, shape):
  import torch
  batch, seq_len = shape
  rec = {"model": name, "side": "hf", "batch": batch, "seq_len": seq_len}
  cuda = rt["torch_device"] == "cuda"
  if cuda:
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
  with ft.HostPeak() as host:
    hf = build_hf(config, args, rt, state)
    rec.update(attn_implementation=hf.attn, optimizer=hf.optimizer, torch_compile=hf.compiled,
               params=sum(p.numel() for p in hf.params))
    print(f"  HF {type(hf.model).__name__}: {rec['params']:,} params, attention {hf.attn}, "
          f"{rt['precision']} ({'autocast bf16' if rt['precision'] == 'mixed' else 'no autocast'}"
          f"), torch.compile {'on' if hf.compiled else 'off'}, gradient checkpointing "
          f"{'on' if rt['hf_checkpointing'] else 'off'}, {hf.optimizer}", flush=True)
    dev = [{k: torch.from_numpy(v.astype(np.int64)).to(hf.device) for k, v in b.items()}
           for b in batches]
    times, losses, busy = [], [], None
    for i in range(args.warmup + args.steps):
      if i == args.warmup:
        busy = ft.Contention().__enter__()
      b = dev[i % len(dev)]
      hf.sync()
      t = time.perf_counter()
      try:
        loss = hf.step(b["inputs"], b["targets"])
      except Exception as e:  # pylint: disable=broad-except
        if i > 0 or not hf.compiled or _is_oom(e):
          raise
        print(f"  WARNING: torch.compile failed ({type(e).__name__}: {str(e)[:300]}); "
              "running eager", flush=True)
        rec.update(torch_compile=False, torch_compile_error=f"{type(e).__name__}: {str(e)[:300]}")
        hf.opt.zero_grad(set_to_none=True)
        hf.forward, hf.compiled = hf.model, False
        hf.sync()
        t = time.perf_counter()
        loss = hf.step(b["inputs"], b["targets"])
      hf.sync()
      times.append(time.perf_counter() - t)
      losses.append(loss)
    busy.__exit__(None, None, None)
    losses = [float(x) for x in losses]
    del hf, dev, loss
    gc.collect()
  rec.update(ft.timing(times, losses, types.SimpleNamespace(  # pylint: disable=protected-access
      warmup=args.warmup, batch=batch, seq_len=seq_len)))
  rec["others_busy"] = busy.others
  rec["compile_s"] = times[0] if rec["torch_compile"] else None  # first step, compile included
  if cuda:
    rec.update(peak_bytes=torch.cuda.max_memory_allocated(),
               peak_reserved_bytes=torch.cuda.max_memory_reserved(),
               memory_how="torch.cuda.max_memory_allocated")
    torch.cuda.empty_cache()
  else:
    rec.update(peak_bytes=host.growth, memory_how=host.how)
  return rec


# ---------------------------------------------------------------------------------------
# decoder_jax side


def compile_step(step, state, batch, rng):
  """(state in the step's steady-state dtypes, compiled step, trace s, compile s, note)."""
  import jax
  t0 = time.perf_counter()
  out_state, _ = jax.eval_shape(step, state, {}, batch, rng)
  flat_in = jax.tree_util.tree_flatten_with_path(state)[0]
  changed = [(jax.tree_util.keystr(p), str(x.dtype), str(o.dtype))
             for (p, x), o in zip(flat_in, jax.tree.leaves(out_state)) if x.dtype != o.dtype]
  note = None
  if changed:  # one executable (with donation) for every step: start from the output dtypes
    state = jax.tree.map(lambda x, o: x.astype(o.dtype), state, out_state)
    kinds = sorted({f"{a}->{b}" for _, a, b in changed})
    note = f"the step returns {len(changed)} state leaves as {', '.join(kinds)}; timed from there"
  lowered = step.lower(state, {}, batch, rng)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  return state, compiled, t1 - t0, time.perf_counter() - t1, note


def xla_estimate(compiled):
  """Bytes XLA plans for one call: arguments + outputs + temporaries - donated aliases."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if m is None:
    return None
  get = lambda k: int(getattr(m, k, 0) or 0)
  return (get("argument_size_in_bytes") + get("output_size_in_bytes")
          + get("temp_size_in_bytes") - get("alias_size_in_bytes"))


def run_jax(name, args, rt, flat, batches, shape):
  import jax
  import jax.numpy as jnp
  from decoder_jax.model import Decoder
  from decoder_jax.train import state as state_lib
  from decoder_jax.train import steps as steps_lib
  batch, seq_len = shape
  rec = {"model": name, "side": "jax", "batch": batch, "seq_len": seq_len}
  device = jax.devices()[0]
  chunk_kw, _ = loss_chunk_kwargs(args.loss_chunk)
  rec["loss_chunk_size"] = chunk_kw.get("loss_chunk_size")

  def prepare(impl):
    config = model_config(name, args, seq_len, dtype=rt["compute_dtype"],
                          param_dtype=rt["param_dtype"], attention_impl=impl)
    params = jax.device_put(ft.unflat(  # pylint: disable=protected-access
        {p: ft.cast(v, rt["param_dtype"]) for p, v in flat.items()}))  # pylint: disable=protected-access
    tx = ft.make_tx(args)
    state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                 opt_state=tx.init(params), tx=tx)
    step = jax.jit(steps_lib.make_train_step(Decoder(config), 1, dropout=False, **chunk_kw),
                   donate_argnums=(0,))
    state, compiled, trace_s, compile_s, note = compile_step(step, state, dev[0], rng)
    rec.update(trace_s=trace_s, compile_s=compile_s, remat=str(config.remat))
    if note:
      rec["state_dtype_note"] = note
      print(f"  note: {note}", flush=True)
    return state, compiled

  dev = [jax.device_put(b) for b in batches]
  rng = jax.random.key(args.seed)
  with ft.HostPeak() as host:
    impl = rt["jax_attention"]
    try:
      state, compiled = prepare(impl)
    except Exception as e:  # pylint: disable=broad-except
      if impl == "xla" or _is_oom(e):
        raise
      print(f"  WARNING: attention {impl!r} failed ({type(e).__name__}: {str(e)[:300]}); "
            "retrying with 'xla'", flush=True)
      rec["attention_fallback"] = f"{type(e).__name__}: {str(e)[:300]}"
      state = None
    if state is None:  # retried outside the except block: its traceback held the device state
      impl = "xla"
      gc.collect()
      state, compiled = prepare(impl)
    rec["attention_impl"] = impl if impl != "auto" else rt["jax_attention_resolved"]
    rec["params"] = sum(x.size for x in jax.tree.leaves(state.params))
    rec["xla_estimate_bytes"] = xla_estimate(compiled)
    print(f"  decoder_jax: {rec['params']:,} params, attention {rec['attention_impl']}, "
          f"remat {rec['remat']}, loss chunk {rec['loss_chunk_size'] or 'off'}, "
          f"{rt['precision']} (params {rt['param_dtype']}, compute {rt['compute_dtype']}), "
          f"trace {rec['trace_s']:.1f} s + compile {rec['compile_s']:.1f} s, XLA plans "
          f"{ft.fmt_bytes(rec['xla_estimate_bytes'])}", flush=True)  # pylint: disable=protected-access
    times, losses, busy = [], [], None
    for i in range(args.warmup + args.steps):
      if i == args.warmup:
        busy = ft.Contention().__enter__()
      t = time.perf_counter()
      state, metrics = compiled(state, {}, dev[i % len(dev)], rng)
      jax.block_until_ready((state, metrics))
      times.append(time.perf_counter() - t)
      losses.append(metrics["loss"])
    busy.__exit__(None, None, None)
    losses = [float(x) for x in losses]
    mem = ft.jax_memory(device)  # pylint: disable=protected-access
    if args.trace_dir:  # after the timed steps, so tracing costs them nothing
      rec.update(trace_steps(args, name, compiled, state, dev, rng))
    del state, compiled, dev, metrics
    gc.collect()
  rec.update(ft.timing(times, losses, types.SimpleNamespace(  # pylint: disable=protected-access
      warmup=args.warmup, batch=batch, seq_len=seq_len)))
  rec["others_busy"] = busy.others
  if rt["gpu"]:
    rec.update(peak_bytes=mem.get("peak_bytes_in_use"), bytes_limit=mem.get("bytes_limit"),
               memory_how="jax peak_bytes_in_use (this side's own process)")
  else:
    rec.update(peak_bytes=host.growth, memory_how=host.how)
  return rec


def trace_steps(args, name, compiled, state, dev, rng):
  """--trace_dir: a jax.profiler trace of --trace_steps more steps in TRACE_DIR/MODEL, and
  decoder_jax.trace_account's split of their device time (ms per step by kind of work)."""
  import jax
  from decoder_jax import trace_account
  directory = os.path.join(os.path.abspath(args.trace_dir), name)
  try:
    with jax.profiler.trace(directory):
      for i in range(args.trace_steps):
        state, metrics = compiled(state, {}, dev[i % len(dev)], rng)
      jax.block_until_ready((state, metrics))
  except Exception as e:  # pylint: disable=broad-except  # e.g. no profiler on this machine
    traceback.print_exc()
    return {"trace_error": f"{type(e).__name__}: {str(e)[:300]}"}
  try:
    acc = trace_account.account(directory)
  except Exception as e:  # pylint: disable=broad-except  # the timed steps must survive it
    traceback.print_exc()
    print(f"  trace in {directory}; no account ({type(e).__name__}: {e})", flush=True)
    return {"trace_dir": directory, "trace_error": f"{type(e).__name__}: {e}"}
  print(f"  trace of {args.trace_steps} steps in {directory}:\n" + "\n".join(
      "    " + line for line in trace_account.format_table(acc, args.trace_steps, 8).splitlines()),
        flush=True)
  return {"trace_dir": directory, "trace_kind": acc.kind,
          "trace_ms_per_step": {k: v / 1e6 / args.trace_steps
                                for k, v in sorted(acc.by_category.items(), key=lambda kv: -kv[1])}}


def _is_oom(e) -> bool:
  text = f"{type(e).__name__}: {e}"
  return ("RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()
          or "OutOfMemoryError" in text)


# ---------------------------------------------------------------------------------------
# Child processes


def _write(path, data):
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(data, f, indent=1, default=str)
  os.replace(tmp, path)


def _median_flops(matmul, sync, n, reps, inner):
  """Median FLOP/s of `inner` back-to-back n^3 matmuls, over `reps` timings."""
  sync(matmul())
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    outs = [matmul() for _ in range(inner)]
    sync(outs)
    times.append((time.perf_counter() - t) / inner)
    del outs
  return 2 * n**3 / statistics.median(times)


def child_peak_jax(args, out_path):
  """JAX's environment and measured matmul peak in the compute dtype."""
  import jax
  import jax.numpy as jnp
  rt = runtime(args)
  data = {"runtime": rt, "env": collect_env(args, rt)}
  n = args.peak_n or (8192 if rt["gpu"] else 1024)
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (n, n), jnp.dtype(rt["compute_dtype"]))
  b = jax.random.normal(kb, (n, n), jnp.dtype(rt["compute_dtype"]))
  mm = jax.jit(jnp.matmul)
  inner = 10 if rt["gpu"] else 2
  data["peak"] = {"n": n, "dtype": rt["compute_dtype"], "reps": args.peak_reps, "inner": inner,
                  "jax_flops": _median_flops(lambda: mm(a, b), jax.block_until_ready, n,
                                             args.peak_reps, inner)}
  _write(out_path, data)


def child_peak_torch(args, out_path):
  """torch's environment and measured matmul peak (reference only)."""
  import torch
  rt = runtime(args)
  env = {"torch": torch.__version__, "torch_cuda_available": torch.cuda.is_available()}
  if torch.cuda.is_available():
    env.update(torch_gpu=torch.cuda.get_device_name(0), torch_cuda=torch.version.cuda)
  data = {"env": env}
  if not rt["gpu"] or torch.cuda.is_available():
    device = "cuda" if rt["gpu"] else "cpu"
    if not rt["gpu"]:
      torch.set_num_threads(args.threads or ft.cores())  # pylint: disable=protected-access
    env["torch_threads"] = torch.get_num_threads()
    n = args.peak_n or (8192 if rt["gpu"] else 1024)
    a = torch.randn(n, n, device=device, dtype=getattr(torch, rt["compute_dtype"]))
    b = torch.randn(n, n, device=device, dtype=getattr(torch, rt["compute_dtype"]))
    sync = (lambda _: torch.cuda.synchronize()) if rt["gpu"] else (lambda _: None)
    data["torch_flops"] = _median_flops(lambda: a @ b, sync, n, args.peak_reps,
                                        10 if rt["gpu"] else 2)
  _write(out_path, data)


def child_model(args, side, name, out_path):
  """One side of one model: same weights (decoder_jax's init on JAX's CPU backend, same
  seed) and batches in either side's process."""
  rt = runtime(args)
  shape = shape_of(name, args)
  out = {"model": name, "batch": shape[0], "seq_len": shape[1], "results": [], "notes": []}
  for note in (remat_field(args.remat)[1], loss_chunk_kwargs(args.loss_chunk)[1]):
    if note:
      out["notes"].append(note)
  if args.remat == "dots_saveable":
    out["notes"].append("--remat dots_saveable has no HF equivalent: HF runs without "
                        "gradient checkpointing")
  if side == "hf" and not rt["gpu"]:
    import torch
    torch.set_num_threads(args.threads or ft.cores())  # pylint: disable=protected-access
  t0 = time.perf_counter()
  config32 = model_config(name, args, shape[1], dtype="float32", param_dtype="float32",
                          attention_impl="xla")
  flat = init_weights(config32, args.seed)
  total, matmul = param_counts(config32, flat)
  out.update(params=total, matmul_params=matmul, layers=config32.num_layers,
             **flops_per_token(config32, shape[1], matmul))
  batches = make_batches(config32.vocab_size, shape[0], shape[1],
                         min(args.warmup + args.steps, 4), args.seed + 2)
  print(f"  {MODELS[name]['label']}: {total:,} params ({matmul:,} in matmuls), "
        f"{config32.num_layers} layers, batch {shape[0]} x {shape[1]}, "
        f"{out['flops_per_token'] / 1e9:.3f} GFLOP/token; init {time.perf_counter() - t0:.1f} s",
        flush=True)
  _write(out_path, out)
  try:
    if side == "hf":
      state = hf_state_dict(config32, flat)
      del flat
      rec = run_hf(name, args, rt, config32, state, batches, shape)
    else:
      rec = run_jax(name, args, rt, flat, batches, shape)
    print(f"  first step {rec['first_step_s']:.2f} s; timed steps "
          f"{', '.join(f'{t * 1e3:.1f}' for t in rec['step_s'])} ms; median "
          f"{rec['ms_per_step']:.1f} ms = {rec['tok_per_s']:,.0f} tok/s; peak memory "
          f"{ft.fmt_bytes(rec['peak_bytes'])}; losses "  # pylint: disable=protected-access
          f"{', '.join(f'{x:.4f}' for x in rec['losses'])}", flush=True)
  except Exception as e:  # pylint: disable=broad-except
    traceback.print_exc()
    rec = {"model": name, "side": side, "batch": shape[0], "seq_len": shape[1],
           "error": ("OOM: " if _is_oom(e) else "") + f"{type(e).__name__}: {str(e)[:300]}"}
  out["results"].append(rec)
  _write(out_path, out)


class _Stop(Exception):
  pass


def find_max(try_fn, start, cap, step, deadline=None, log=print):
  """Largest batch b <= cap with try_fn(b)["ok"]: doubling from `start` (halving when it
  fails), then bisection until the first failing batch is within `step`. Returns
  {"max": largest ok (0: none), "first_fail": smallest failing one tried above it or None,
  "capped": reached cap without a failure, "stopped": why it stopped early, "tries"}."""
  tries, order = {}, []
  state = {"last_s": 0.0, "stopped": None}

  def ok(b):
    if b in tries:
      return tries[b]["ok"]
    if deadline is not None and time.time() + 1.3 * state["last_s"] > deadline:
      state["stopped"] = f"time limit, before trying batch {b}"
      raise _Stop
    t = time.perf_counter()
    rec = dict(try_fn(b), batch=b)
    rec["try_s"] = state["last_s"] = time.perf_counter() - t
    tries[b] = rec
    order.append(rec)
    log(f"  batch {b}: {'ok' if rec['ok'] else 'failed'} ({rec['try_s']:.1f} s"
        f"{'; ' + rec['error'][:160] if rec.get('error') else ''})")
    return rec["ok"]

  lo, hi = 0, None
  try:
    b = max(1, min(start, cap))
    if ok(b):
      lo = b
      while lo < cap:
        b = min(2 * lo, cap)
        if ok(b):
          lo = b
        else:
          hi = b
          break
    else:
      hi = b
      while hi > 1:
        b = hi // 2
        if ok(b):
          lo = b
          break
        hi = b
    while hi is not None and hi - lo > step:
      mid = (lo + hi) // 2
      rounded = mid - mid % step
      if rounded > lo:
        mid = rounded
      if not lo < mid < hi:
        break
      if ok(mid):
        lo = mid
      else:
        hi = mid
  except _Stop:
    pass
  return {"max": lo, "first_fail": hi, "cap": cap, "capped": hi is None and lo >= cap,
          "stopped": state["stopped"], "tries": order}


def jax_search_try(name, args, rt, seq_len):
  """try_fn(batch) for find_max: fresh random params and state on the device, a compiled
  step for that batch, --search_steps steps."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from decoder_jax.model import Decoder
  from decoder_jax.train import state as state_lib
  from decoder_jax.train import steps as steps_lib
  chunk_kw, _ = loss_chunk_kwargs(args.loss_chunk)
  tx = ft.make_tx(args)
  setup = {"impl": rt["jax_attention"]}

  def build(impl):
    config = model_config(name, args, seq_len, dtype=rt["compute_dtype"],
                          param_dtype=rt["param_dtype"], attention_impl=impl)
    model = Decoder(config)

    @jax.jit
    def make_state(key):
      params = nn.unbox(model.init(key, jnp.zeros((1, 8), jnp.int32))["params"])
      return state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                  opt_state=tx.init(params), tx=tx)

    step = jax.jit(steps_lib.make_train_step(model, 1, dropout=False, **chunk_kw),
                   donate_argnums=(0,))
    return config, make_state, step

  setup["config"], setup["make_state"], setup["step"] = build(setup["impl"])
  rng = jax.random.key(args.seed)

  def try_fn(batch):
    state = compiled = tokens = metrics = None
    rec = {"ok": False}
    try:
      rs = np.random.RandomState(args.seed + batch)
      t = rs.randint(0, setup["config"].vocab_size, size=(batch, seq_len + 1))
      tokens = jax.device_put({"inputs": t[:, :-1].astype(np.int32),
                               "targets": t[:, 1:].astype(np.int32)})
      while True:
        try:
          state = setup["make_state"](jax.random.key(args.seed))
          state, compiled, trace_s, compile_s, _ = compile_step(setup["step"], state, tokens, rng)
          break
        except Exception as e:  # pylint: disable=broad-except
          if _is_oom(e) or setup["impl"] == "xla":
            raise
          print(f"  WARNING: attention {setup['impl']!r} failed ({type(e).__name__}: "
                f"{str(e)[:200]}); using 'xla'", flush=True)
          setup["impl"] = "xla"
          setup["fallback"] = f"{type(e).__name__}: {str(e)[:300]}"
          state = None
          setup["config"], setup["make_state"], setup["step"] = build("xla")
      rec.update(trace_s=trace_s, compile_s=compile_s, xla_estimate_bytes=xla_estimate(compiled))
      times, losses = [], []
      for _ in range(args.search_steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, {}, tokens, rng)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
        losses.append(float(metrics["loss"]))
      rec.update(ok=True, step_s=times, losses=losses)
    except Exception as e:  # pylint: disable=broad-except
      if not _is_oom(e):
        raise
      rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    finally:
      del state, compiled, tokens, metrics
      gc.collect()
    return rec

  return try_fn, setup


def hf_search_try(name, args, rt, seq_len):
  """try_fn(batch) for find_max: one HF model and optimizer (compiled once, batch marked
  dynamic), --search_steps steps on a random batch, peak memory reset per try."""
  import torch
  config = model_config(name, args, seq_len, dtype="float32", param_dtype="float32",
                        attention_impl="xla")
  hf = build_hf(config, args, rt)
  setup = {"compiled": hf.compiled}

  def try_fn(batch):
    tokens = inputs = targets = None
    rec = {"ok": False}
    if hf.cuda:
      torch.cuda.reset_peak_memory_stats()
    try:
      gen = torch.Generator(device="cpu").manual_seed(args.seed + batch)
      tokens = torch.randint(0, config.vocab_size, (batch, seq_len + 1), generator=gen)
      tokens = tokens.to(hf.device)
      inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
      if hf.compiled:
        torch._dynamo.maybe_mark_dynamic(inputs, 0)  # pylint: disable=protected-access
        torch._dynamo.maybe_mark_dynamic(targets, 0)  # pylint: disable=protected-access
      times, losses = [], []
      for _ in range(args.search_steps):
        hf.sync()
        t0 = time.perf_counter()
        loss = hf.step(inputs, targets)
        hf.sync()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
      rec.update(ok=True, step_s=times, losses=losses)
      if hf.cuda:
        rec["peak_bytes"] = torch.cuda.max_memory_allocated()
    except Exception as e:  # pylint: disable=broad-except
      if not _is_oom(e):
        raise
      rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    finally:
      hf.opt.zero_grad(set_to_none=True)
      del tokens, inputs, targets
      gc.collect()
      if hf.cuda:
        torch.cuda.empty_cache()
    return rec

  return try_fn, setup


def child_search(args, side, name, out_path):
  rt = runtime(args)
  seq_len = shape_of(name, args)[1]
  cap = args.search_cap or (4096 if rt["gpu"] else 4)
  step = args.search_step or (8 if rt["gpu"] else 1)
  config32 = model_config(name, args, seq_len, dtype="float32", param_dtype="float32",
                          attention_impl="xla")
  total, matmul = param_counts(config32, _abstract_params(config32))
  out = {"model": name, "side": side, "seq_len": seq_len, "params": total,
         "layers": config32.num_layers,
         "matmul_params": matmul, **flops_per_token(config32, seq_len, matmul),
         "start": args.search_start, "cap": cap, "step": step, "search_steps": args.search_steps}
  if side == "jax":
    out["loss_chunk_size"] = loss_chunk_kwargs(args.loss_chunk)[0].get("loss_chunk_size")
  if side == "hf" and not rt["gpu"]:
    import torch
    torch.set_num_threads(args.threads or ft.cores())  # pylint: disable=protected-access
  print(f"  {SIDE_LABELS[side]} {name}: batch search at seq {seq_len}, from "
        f"{args.search_start} up to {cap}, precision {step}, {args.search_steps} steps per "
        f"try{'' if side == 'hf' else ', loss chunk ' + str(out['loss_chunk_size'] or 'off')}",
        flush=True)
  try_fn, setup = (jax_search_try if side == "jax" else hf_search_try)(name, args, rt, seq_len)
  out.update(find_max(try_fn, args.search_start, cap, step, deadline=args._deadline,
                      log=lambda s: print(s, flush=True)))
  out["setup"] = {k: v for k, v in setup.items() if isinstance(v, (str, bool, int, float))}
  _write(out_path, out)


def _abstract_params(config):
  """{flat path: ShapeDtypeStruct} of config's parameters (nothing allocated)."""
  import flax.linen as nn
  from decoder_jax.interop import hf as hf_interop
  return ft.flat(nn.unbox(hf_interop.abstract_params(config)))  # pylint: disable=protected-access


# ---------------------------------------------------------------------------------------
# Parent: environment, children, table


def collect_env(args, rt):
  import jax
  device = jax.devices()[0]
  v = ft.version  # pylint: disable=protected-access
  env = {
      "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
      "python": platform.python_version(), "platform": platform.platform(),
      "cpu": ft.cpu_name(), "cores": ft.cores(),  # pylint: disable=protected-access
      "jax": v("jax"), "jaxlib": v("jaxlib"), "flax": v("flax"), "optax": v("optax"),
      "torch": v("torch"), "transformers": v("transformers"),
      "jax_device": getattr(device, "device_kind", str(device)), **rt,
      "remat": args.remat, "loss_chunk": args.loss_chunk, "loadavg_start": os.getloadavg(),
      "xla_flags": os.environ.get("XLA_FLAGS", "(unset)"),
  }
  for plugin in ("jax-cuda12-plugin", "jax-cuda13-plugin"):
    if v(plugin) != "not installed":
      env[plugin] = v(plugin)
  return env


class Runner:
  """Starts children (each in its own process group), within the run's time limit."""

  def __init__(self, args, argv):
    self.args, self.argv = args, list(argv)
    self.gpu = None  # known after the peak:jax child; then passed on as --_gpu
    self.dir = tempfile.mkdtemp(prefix="train_speed_")
    self.deadline = time.time() + args.time_limit_s if args.time_limit_s else None

  def left(self):
    return None if self.deadline is None else self.deadline - time.time()

  def run(self, kind, share=1.0, extra_env=None, reserve=5.0):
    """Runs child `kind`; returns (status, data). share: the fraction of the time left
    this child may use."""
    out = os.path.join(self.dir, kind.replace(":", "_") + ".json")
    left = self.left()
    timeout = deadline = None
    if left is not None:
      if left - reserve < 20:
        return "skipped (time limit)", None
      # Its share of the time left, but not less than a minute (or what is left): a share
      # too small to start in would only waste it.
      timeout = max((left - reserve) * share, min(60.0, left - reserve))
      deadline = time.time() + timeout - 3
    cmd = [sys.executable, os.path.abspath(__file__)] + self.argv + ["--_child", kind,
                                                                      "--_out", out]
    if deadline is not None:
      cmd += ["--_deadline", f"{deadline:.1f}"]
    if self.gpu is not None:
      cmd += ["--_gpu", str(int(self.gpu))]
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{self.args.jax_mem_fraction:g}")
    if ":hf:" in f":{kind}:" or kind == "peak:torch":
      # torch's process: JAX only initialises weights there, on the CPU, so no second CUDA
      # client (nor a second cuDNN) shares the process or the device with torch.
      env["JAX_PLATFORMS"] = "cpu"
    elif not self.args.no_launch_flags:
      xla_flags.apply_launch_flags(env)  # what `python -m decoder_jax.train` sets
    env.update(extra_env or {})
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
      rc = proc.wait(timeout=timeout)
      status = "ok" if rc == 0 else f"exit code {rc}"
    except subprocess.TimeoutExpired:
      _kill_group(proc)
      status = f"killed at the time limit ({timeout:.0f} s)"
    except KeyboardInterrupt:
      _kill_group(proc)
      raise
    data = None
    if os.path.exists(out):
      with open(out) as f:
        data = json.load(f)
    return status, data


def _interrupt(signum, frame):
  raise KeyboardInterrupt(f"signal {signum}")


def _kill_group(proc):
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass
  proc.wait()


def mfu(tok_s, fpt, peak):
  if not tok_s or not fpt or not peak:
    return None
  return tok_s * fpt / peak


def _verdict(met, env):
  if not env.get("gpu"):
    return "n/a, not a GPU run"
  where = "" if "H200" in str(env.get("jax_device")) else f" (on a {env.get('jax_device')})"
  return ("met" if met else "not met") + where


def summary_lines(models, searches, env, peak, args):
  fmt = ft.fmt_bytes  # pylint: disable=protected-access
  peak_flops = peak.get("jax_flops")
  lines = [f"- MFU = tokens/s x (6 N + 6 L T d) / measured peak; N = parameters in matmuls "
           f"(all but GPT-2's position table; tied embeddings counted once, as the output "
           f"projection), L layers, T sequence, d = heads x head_dim (causal attention). "
           f"Peak: jnp.matmul {peak.get('n')}^3 {peak.get('dtype')} median "
           f"{_flops(peak_flops)}"
           + (f" (torch.matmul: {_flops(peak['torch_flops'])})" if peak.get("torch_flops")
              else "")]
  for name, m in models.items():
    if not m or not m.get("by_side"):
      continue
    j, h = m["by_side"].get("jax"), m["by_side"].get("hf")
    ok = lambda r: r is not None and "error" not in r
    if ok(j) and ok(h):
      ratio = j["tok_per_s"] / h["tok_per_s"]
      line = (f"- {name}: decoder_jax / HF tokens/s = **{ratio:.2f}x** ({j['tok_per_s']:,.0f} "
              f"vs {h['tok_per_s']:,.0f}; MFU {_pct(j.get('mfu'))} vs {_pct(h.get('mfu'))}; "
              f"peak memory {fmt(j['peak_bytes'])} vs {fmt(h['peak_bytes'])})")
      if name in SPEED_TARGETS:
        line += (f"; target >= {SPEED_TARGETS[name]}x on an H200: "
                 f"{_verdict(ratio >= SPEED_TARGETS[name], env)}")
      lines.append(line)
      diff = abs(j["loss_first"] - h["loss_first"])
      tol = args.loss_tol if env.get("precision") == "float32" else BF16_WARN
      lines.append(f"- {name} cross-check: step-0 loss decoder_jax {j['loss_first']:.6f} vs HF "
                   f"{h['loss_first']:.6f}, |diff| {diff:.1e} "
                   f"({'ok' if diff <= tol else 'MISMATCH'}, tol {tol:g}, same weights and "
                   f"batch, {env.get('precision')}); last step {j['loss_last']:.4f} vs "
                   f"{h['loss_last']:.4f}")
      if diff > tol and env.get("precision") == "float32":
        m["mismatch"] = True
    if name == "gpt2" and ok(h):
      lines.append(f"- gpt2: this run's HF peer {h['tok_per_s']:,.0f} tok/s against nanoGPT's "
                   f"{NANOGPT_TOK_S:,.0f} on an H200 (the issue's figure)"
                   + (f"; decoder_jax {j['tok_per_s']:,.0f} = "
                      f"{j['tok_per_s'] / NANOGPT_TOK_S:.2f}x that figure" if ok(j) else ""))
    if name == "gpt2" and ok(j) and peak_flops:
      lines.append(f"- gpt2 decoder_jax MFU with nanoGPT's non-causal attention count "
                   f"(6 N + 12 L T d): {_pct(mfu(j['tok_per_s'], m['flops_per_token_noncausal'], peak_flops))}")
    if name in MFU_TARGET and ok(j):
      lines.append(f"- {name}: decoder_jax MFU **{_pct(j.get('mfu'))}** (target >= "
                   f"{MFU_TARGET[name]:.0%} of the measured peak on an H200: "
                   f"{_verdict((j.get('mfu') or 0) >= MFU_TARGET[name], env)}); "
                   f"{m['params']:,} params, {m['flops_per_token'] / 1e9:.2f} GFLOP/token")
    if ok(j) and j.get("trace_ms_per_step"):
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
                   f"H200: {_verdict(j['max'] > h['max'] and not h.get('capped'), env)}; "
                   f"loss chunk {j.get('loss_chunk_size') or 'off'}, remat {args.remat})")
    elif j or h:
      lines.append(f"- {name} max batch: decoder_jax {_bound(j) if j else '-'}, HF "
                   f"{_bound(h) if h else '-'}")
  return lines


def _bound(s):
  if s is None:
    return "-"
  if s.get("capped"):
    return f">= {s['max']} (cap)"
  text = str(s["max"])
  if s.get("first_fail"):
    text += f" ({s['first_fail']} fails)"
  if s.get("stopped"):
    text += f" [stopped: {s['stopped']}]"
  return text


def _flops(x):
  return f"{x / 1e12:.1f} TFLOP/s" if x >= 1e12 else f"{x / 1e9:.1f} GFLOP/s"


def _pct(x):
  return "-" if x is None else f"{100 * x:.1f}%"


def table_lines(models, searches, env):
  fmt = ft.fmt_bytes  # pylint: disable=protected-access
  mem = "peak device memory" if env.get("gpu") else "peak RSS growth"
  lines = [f"| model | side | batch x seq | ms/step (median) | tokens/s | MFU | {mem} | "
           "compile s | loss step 0 -> last | others busy |",
           "|---|---|---|---:|---:|---:|---:|---:|---|---:|"]
  for name, m in models.items():
    label = _model_label(name, m.get("layers"))
    for side in ("jax", "hf"):
      r = (m.get("by_side") or {}).get(side)
      shape = f"{m.get('batch', '?')} x {m.get('seq_len', '?')}"
      side_label = SIDE_LABELS[side] + (" (compiled)" if side == "hf" and r and
                                        r.get("torch_compile") else "")
      if r is None:
        if side in m.get("status", {}):
          status = m["status"][side]
          lines.append(f"| {label} | {side_label} | {shape} | "
                       f"{'no result' if status == 'ok' else status} | | | | | | |")
        continue
      if "error" in r:
        lines.append(f"| {label} | {side_label} | {shape} | failed: {r['error'][:120]} "
                     "| | | | | | |")
        continue
      comp = (f"{r['trace_s']:.1f} + {r['compile_s']:.1f}" if side == "jax" else
              (f"{r['compile_s']:.1f} (1st step)" if r.get("compile_s") is not None else "-"))
      busy = "?" if r.get("others_busy") is None else f"{r['others_busy']:.0%}"
      lines.append(f"| {label} | {side_label} | {shape} | {r['ms_per_step']:.1f} | "
                   f"{r['tok_per_s']:,.0f} | {_pct(r.get('mfu'))} | {fmt(r['peak_bytes'])} | "
                   f"{comp} | {r['loss_first']:.4f} -> {r['loss_last']:.4f} | {busy} |")
  for name, s in searches.items():
    for side in ("jax", "hf"):
      r = s.get(side)
      label = _model_label(name, (r or {}).get("layers")) + ": max batch"
      if r is None or "max" not in r:
        status = s.get(f"{side}_status", "not run")
        lines.append(f"| {label} | {SIDE_LABELS[side]} | ? x {s.get('seq_len', '?')} | "
                     f"{status} | | | | | | |")
        continue
      best = next((t for t in r["tries"] if t["batch"] == r["max"] and t["ok"]), None)
      if best is None:
        lines.append(f"| {label} | {SIDE_LABELS[side]} | {_bound(r)} x {r['seq_len']} | "
                     "no batch trained | | | | | | |")
        continue
      step_s = best["step_s"][-1]
      tok_s = r["max"] * r["seq_len"] / step_s
      peak = (f"~{fmt(best.get('xla_estimate_bytes'))} (XLA plan)" if side == "jax" else
              fmt(best.get("peak_bytes")))
      comp = (f"{best['trace_s']:.1f} + {best['compile_s']:.1f}" if side == "jax" else "-")
      lines.append(f"| {label} | {SIDE_LABELS[side]} | **{_bound(r)}** x {r['seq_len']} | "
                   f"{step_s * 1e3:.1f} (last of {len(best['step_s'])}) | {tok_s:,.0f} | "
                   f"{_pct(r.get('mfu'))} | {peak} | {comp} | {best['losses'][0]:.4f} -> "
                   f"{best['losses'][-1]:.4f} | - |")
  return lines


def _model_label(name, layers):
  if layers and layers != _default_layers(name):
    return MODELS[name]["label"] + f" ({layers} layer{'s' if layers != 1 else ''})"
  return MODELS[name]["label"]


def _default_layers(name):
  spec = MODELS[name]
  if spec["fields"]:
    return spec["fields"]["num_layers"]
  return {"gpt2": 12, "smollm2": 30}[name]


def note_text(env):
  how = ("decoder_jax: device peak_bytes_in_use of its own process; HF: "
         "torch.cuda.max_memory_allocated" if env.get("gpu") else
         "growth of the process's peak RSS (VmHWM) over each side, setup and compile included")
  prec = {"mixed": "float32 params, grads and Adam moments, bf16 compute (HF: "
                   "torch.autocast bf16)",
          "bfloat16": "bf16 params and compute on both sides",
          "float32": "float32 everywhere"}[env.get("precision", "float32")]
  return (f"Precision: {prec}. ms/step: median of the timed steps, each timed alone. Memory: "
          f"{how}. compile s: decoder_jax trace + XLA compile; HF the first step (with "
          f"torch.compile when on). 'others busy': share of all cores other processes used "
          f"during the timed steps.")


def header_line(env, args):
  hw = (f"{env.get('jax_device')} (torch: {env.get('torch_gpu', '-')}, CUDA "
        f"{env.get('torch_cuda', '-')})" if env.get("gpu") else
        f"{env.get('cpu')}, {env.get('cores')} cores (CPU)")
  versions = (f"python {env.get('python')}, jax/jaxlib {env.get('jax')}/{env.get('jaxlib')}, "
              f"flax {env.get('flax')}, optax {env.get('optax')}, torch {env.get('torch')}, "
              f"transformers {env.get('transformers')}")
  plugins = [f"{k} {env[k]}" for k in ("jax-cuda12-plugin", "jax-cuda13-plugin") if k in env]
  if plugins:
    versions += ", " + ", ".join(plugins)
  return (f"Hardware: {hw}. Versions: {versions}. Precision {env.get('precision')}, median of "
          f"{args.steps} timed steps after {args.warmup} warm-up, decoder_jax attention "
          f"{env.get('jax_attention')} ({env.get('jax_attention_resolved')}), scan_layers, remat "
          f"{args.remat}, loss chunk {args.loss_chunk or 'off'}; HF SDPA, torch.compile "
          f"{'on' if env.get('torch_compile') else 'off'}; AdamW lr {args.lr:g}, wd "
          f"{args.weight_decay:g}, clip {args.grad_clip:g}; random tokens.")


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  if args._child:  # pylint: disable=protected-access
    kind = args._child.split(":")  # pylint: disable=protected-access
    if kind == ["peak", "jax"]:
      return child_peak_jax(args, args._out)  # pylint: disable=protected-access
    if kind == ["peak", "torch"]:
      return child_peak_torch(args, args._out)  # pylint: disable=protected-access
    child = child_model if kind[0] == "model" else child_search
    return child(args, kind[1], kind[2], args._out)  # pylint: disable=protected-access

  command = "python " + shlex.join(sys.argv if argv == sys.argv[1:] else
                                   ["benchmarks/train_speed.py"] + argv)
  runner = Runner(args, argv)
  # SIGTERM (e.g. from benchmarks/gpu_checks.py at its time cap) ends the running child
  # too, through Runner.run's KeyboardInterrupt path: each child has its own session.
  signal.signal(signal.SIGTERM, _interrupt)
  try:
    return _parent(args, runner, command)
  finally:
    shutil.rmtree(runner.dir, ignore_errors=True)  # the children's JSON (merged into --json_out)


def _parent(args, runner, command):
  print(f"# pretraining step benchmark: models {args.models or 'none'}, sides {args.sides}"
        f"{', max batch search ' + ','.join(args.search_models) if args.max_batch_search else ''}"
        f"; time limit {args.time_limit_s or 'none'} s", flush=True)
  print("\n## environment and matmul peak", flush=True)
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
    if data.get("torch_flops"):
      peak["torch_flops"] = data["torch_flops"]
  env["command"] = command
  for k, val in env.items():
    print(f"  {k}: {val}")
  print(f"  matmul peak ({peak['n']}^3 {peak['dtype']}, median of {peak['reps']}): jax "
        f"{_flops(peak['jax_flops'])}" + (f", torch {_flops(peak['torch_flops'])}"
                                          if peak.get("torch_flops") else ""), flush=True)
  if "hf" in args.sides and env["gpu"] and not env.get("torch_cuda_available"):
    raise SystemExit(f"ABORT: JAX runs on the GPU but torch {env['torch']} has no CUDA: the HF "
                     "rows would run elsewhere. Install a CUDA torch or pass --sides jax.")

  models, notes = {}, []
  todo = [(n, s) for n in args.models for s in ("jax", "hf") if s in args.sides]
  for i, (name, side) in enumerate(todo):
    print(f"\n## {name}: {MODELS[name]['label']}, {SIDE_LABELS[side]}", flush=True)
    status, data = runner.run(f"model:{side}:{name}", share=1.0 / (len(todo) - i))
    batch, seq_len = shape_of(name, args)
    m = models.setdefault(name, {"model": name, "batch": batch, "seq_len": seq_len,
                                 "by_side": {}, "status": {}})
    m["status"][side] = status
    for k, val in (data or {}).items():
      if k not in ("results", "notes"):
        m[k] = val
    for r in (data or {}).get("results", []):
      if "error" not in r:
        r["mfu"] = mfu(r["tok_per_s"], m.get("flops_per_token"), peak["jax_flops"])
      m["by_side"][side] = r
    notes += [n for n in (data or {}).get("notes", []) if n not in notes]
    if status != "ok":
      print(f"  {name} {side}: child {status}", flush=True)

  searches = {}
  if args.max_batch_search and not env["gpu"] and not args.force_search:
    notes.append("max batch search skipped: not a GPU run (--force_search with a small "
                 "--search_cap runs it on CPU)")
  elif args.max_batch_search:
    todo = [(n, s) for n in args.search_models for s in ("jax", "hf") if s in args.sides]
    for i, (name, side) in enumerate(todo):
      print(f"\n## max batch search: {name}, {SIDE_LABELS[side]}", flush=True)
      extra = {"PYTORCH_CUDA_ALLOC_CONF": os.environ.get(
          "PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")} if side == "hf" else None
      status, data = runner.run(f"search:{side}:{name}", share=1.0 / (len(todo) - i),
                                extra_env=extra)
      s = searches.setdefault(name, {"seq_len": shape_of(name, args)[1]})
      s[f"{side}_status"] = status
      if data is not None and "max" in data:
        best = next((t for t in data["tries"] if t["batch"] == data["max"] and t["ok"]), None)
        if best:
          data["mfu"] = mfu(data["max"] * data["seq_len"] / best["step_s"][-1],
                            data["flops_per_token"], peak["jax_flops"])
        s[side] = data
        if data.get("setup", {}).get("fallback"):
          notes.append(f"{name} search: decoder_jax attention fell back to xla "
                       f"({data['setup']['fallback'][:120]})")
      if status != "ok":
        print(f"  search {name} {side}: child {status}", flush=True)

  for m in models.values():
    r = m["by_side"].get("jax")
    if r and r.get("attention_fallback"):
      notes.append(f"{m['model']}: decoder_jax attention fell back to xla "
                   f"({r['attention_fallback'][:120]})")
    r = m["by_side"].get("hf")
    if r and r.get("torch_compile_error"):
      notes.append(f"{m['model']}: torch.compile failed, HF ran eager "
                   f"({r['torch_compile_error'][:120]})")
  lines = summary_lines(models, searches, env, peak, args) + [f"- note: {n}" for n in notes]
  print("\n## summary")
  print("\n".join(lines))
  table = table_lines(models, searches, env)
  if args.json_out:
    with open(args.json_out, "w") as f:
      json.dump({"env": env, "peak": peak, "args": vars(args), "models": models,
                 "searches": searches, "summary": lines}, f, indent=1, default=str)
    print(f"wrote {args.json_out}")
  if args.table_out:
    text = ["", f"## Pretraining step throughput, decoder_jax vs. HF transformers "
            f"({env['date_utc']} UTC)", "", f"`{command}`", "", header_line(env, args), ""]
    text += table + ["", note_text(env), ""] + lines
    with open(args.table_out, "a") as f:
      f.write("\n".join(text) + "\n")
    print(f"appended a section to {args.table_out}")
  print(f"\n## results ({header_line(env, args)})\n")
  print("\n".join(table))
  print("\n" + note_text(env))
  if any(m.get("mismatch") for m in models.values()):
    return 2
  return 0


def _per_model_ints(flag):
  def parse(text):
    text = text.strip()
    if "=" not in text:
      return int(text)
    out = {}
    for part in text.split(","):
      name, _, value = part.partition("=")
      if name.strip() not in MODELS:
        raise argparse.ArgumentTypeError(f"{flag}: unknown model {name!r}")
      out[name.strip()] = int(value)
    return out
  return parse


def _names(text, allowed):
  names = [x.strip() for x in text.split(",") if x.strip()]
  if names in (["none"], []):
    return []
  bad = [n for n in names if n not in allowed]
  if bad:
    raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(allowed)} or none")
  return names


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--models", default="gpt2,smollm2,llama1b",
                  type=lambda t: _names(t, tuple(MODELS)),
                  help=f"comma list of {', '.join(MODELS)}, or none")
  ap.add_argument("--sides", default="jax,hf", type=lambda t: _names(t, SIDES))
  ap.add_argument("--no_launch_flags", action="store_true",
                  help="run decoder_jax without the XLA flags the train launcher adds "
                  "(decoder_jax/xla_flags.py): the 'before' of a before/after")
  ap.add_argument("--batch", type=_per_model_ints("--batch"), default=None,
                  help="batch of every model, or per model: gpt2=16,llama1b=8 (defaults: "
                  + ", ".join(f"{n} {s['batch']}" for n, s in MODELS.items()) + ")")
  ap.add_argument("--seq_len", type=_per_model_ints("--seq_len"), default=None,
                  help="sequence length, same forms as --batch (defaults: "
                  + ", ".join(f"{n} {s['seq_len']}" for n, s in MODELS.items()) + ")")
  ap.add_argument("--num_layers", type=int, default=0, help="override every model's layer "
                  "count (smoke tests)")
  ap.add_argument("--steps", type=int, default=10, help="timed steps per side")
  ap.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
  ap.add_argument("--precision", default="auto", choices=("auto", "mixed", "bfloat16", "float32"),
                  help="auto: mixed on a GPU (float32 params, bf16 compute), float32 on CPU")
  ap.add_argument("--remat", default="none", choices=("none", "dots_saveable", "full"),
                  help="decoder_jax remat policy where supported; full also turns on HF "
                  "gradient checkpointing")
  ap.add_argument("--loss_chunk", type=int, default=0,
                  help="decoder_jax make_train_step(loss_chunk_size=N) where supported (0: off)")
  ap.add_argument("--jax_attention", default="auto", choices=("auto", "xla", "cudnn"))
  ap.add_argument("--torch_compile", action=argparse.BooleanOptionalAction, default=None,
                  help="torch.compile the HF model (default: on with CUDA, off on CPU)")
  ap.add_argument("--torch_compile_mode", default=None)
  ap.add_argument("--lr", type=float, default=6e-4)
  ap.add_argument("--weight_decay", type=float, default=0.1)
  ap.add_argument("--grad_clip", type=float, default=1.0, help="global-norm clip (0: none)")
  ap.add_argument("--loss_tol", type=float, default=1e-3,
                  help="float32 step-0 loss agreement required (exit code 2 otherwise)")
  ap.add_argument("--trace_dir", default=None, help="after each decoder_jax side's timed "
                  "steps, trace --trace_steps more into TRACE_DIR/MODEL and print where their "
                  "device time went (decoder_jax.trace_account)")
  ap.add_argument("--trace_steps", type=int, default=3)
  ap.add_argument("--max_batch_search", action="store_true")
  ap.add_argument("--force_search", action="store_true", help="run the search on CPU too")
  ap.add_argument("--search_models", default="gpt2", type=lambda t: _names(t, tuple(MODELS)))
  ap.add_argument("--search_start", type=int, default=16)
  ap.add_argument("--search_cap", type=int, default=0, help="0: 4096 on a GPU, 4 on CPU")
  ap.add_argument("--search_step", type=int, default=0, help="bisection precision (0: 8 on a "
                  "GPU, 1 on CPU)")
  ap.add_argument("--search_steps", type=int, default=2, help="training steps per try")
  ap.add_argument("--peak_n", type=int, default=0, help="matmul size (0: 8192 GPU, 1024 CPU)")
  ap.add_argument("--peak_reps", type=int, default=5)
  ap.add_argument("--jax_mem_fraction", type=float, default=0.95,
                  help="XLA_PYTHON_CLIENT_MEM_FRACTION for the children (unless set)")
  ap.add_argument("--time_limit_s", type=float, default=460,
                  help="whole-run limit in seconds (0: none)")
  ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--json_out", default=None)
  ap.add_argument("--table_out", default=None, help="append a markdown section (date, "
                  "hardware, versions, command, table, summary), e.g. benchmarks/RESULTS.md")
  ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
  ap.add_argument("--_out", default=None, help=argparse.SUPPRESS)
  ap.add_argument("--_deadline", type=float, default=None, help=argparse.SUPPRESS)
  ap.add_argument("--_gpu", type=int, default=None, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if (args.steps < 1 or args.warmup < 0 or not args.sides or args.search_steps < 1
      or args.search_start < 1):
    ap.error("need --steps >= 1, --warmup >= 0, some --sides, --search_steps >= 1, "
             "--search_start >= 1")
  for flag in ("batch", "seq_len"):
    value = getattr(args, flag)
    values = value.values() if isinstance(value, dict) else [value] if value else []
    if any(v < 1 for v in values):
      ap.error(f"--{flag} must be positive")
  for name in set(args.models) | (set(args.search_models) if args.max_batch_search else set()):
    if name == "gpt2" and shape_of(name, args)[1] > 1024:
      ap.error("--seq_len: GPT-2's learned position table has 1024 positions")
  if not args.models and not args.max_batch_search:
    ap.error("nothing to run: --models none without --max_batch_search")
  return args


if __name__ == "__main__":
  sys.exit(main())
