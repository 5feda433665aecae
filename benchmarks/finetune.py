"""Fine-tuning step throughput, side by side: decoder_jax vs. Hugging Face transformers + PEFT.

Training tokens per second of a full fine-tuning step and of a LoRA step (rank 16,
alpha 32, dropout 0, on every attention and MLP projection) on the SmolLM2-135M
architecture (30 layers, width 576, 9 query / 3 key-value heads, SwiGLU 1536, vocabulary
49,152, tied embeddings), random weights, random token batches of --batch x --seq_len
(fixed seed), next-token cross-entropy on every position, AdamW (lr 1e-4, betas
0.9/0.999, eps 1e-8, weight decay 0, global-norm clip 1.0 on both sides).

Four rows, one process, same weights (decoder_jax's random init is copied into the HF
model through decoder_jax.interop.hf's tensor map; the LoRA rows also share the adapter
init, lora_b = 0):
  decoder_jax full   Decoder(preset("smollm2-135m"), scan_layers=True), train.steps.
                     make_train_step under jax.jit (state donated), every param trainable.
  decoder_jax LoRA   the same with model.lora = LoraConfig(16, 32, 0.0, targets
                     attn/.* + mlp/.*); params split with peft.split into the adapters
                     (trained, --adapter_dtype) and the frozen base, held in the compute
                     dtype (--dtype), as train.frozen_dtype does in the training loop.
  HF full            LlamaForCausalLM, attn_implementation="sdpa", loss from the model
                     (labels + shift_labels: all positions), torch.optim.AdamW (fused on
                     CUDA), clip_grad_norm_, torch.compile(model) with --torch_compile.
  HF+PEFT LoRA       peft.get_peft_model(LoraConfig(r=16, lora_alpha=32, lora_dropout=0,
                     target_modules=q,k,v,o,gate,up,down_proj)); adapters in
                     --adapter_dtype (float32 by default: PEFT's autocast_adapter_dtype).

Per row: median ms per step over --steps timed steps after --warmup steps (each step
timed on its own: jax.block_until_ready on the new state and metrics; torch.cuda.
synchronize on a GPU), tokens/s = batch * seq_len / median, trainable params, peak
memory (GPU: jax peak_bytes_in_use / torch.cuda.max_memory_allocated; CPU: growth of the
process's peak RSS over the side, VmHWM after resetting it through /proc/self/clear_refs),
decoder_jax's trace + XLA compile seconds, the first step's seconds (HF: includes
torch.compile), losses of the first and last step. Then the ratios decoder_jax / HF for
full and LoRA against the targets (1.3x and 1.5x) and whether decoder_jax's LoRA step is
faster than its full step.

Cross-check: all rows see the same first batch with the same weights (adapters start as
a no-op), so their first-step losses must agree: within --loss_tol (1e-3) in float32,
else the run aborts. In bfloat16 it is printed, with a warning above 0.05.

  python benchmarks/finetune.py                                  # H200: bf16, torch.compile
  python benchmarks/finetune.py --batch 2 --seq_len 64 --steps 2 --warmup 1   # CPU smoke run
  python benchmarks/finetune.py --remat full --json_out /tmp/ft.json --table_out benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import time

# One process holds both frameworks: JAX must not grab 75% of the GPU up front. Set
# before jax is imported (an explicit setting in the environment wins).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import numpy as np

from machine import busy_cpu_seconds, cores, cpu_name, version  # benchmarks/machine.py

PRESET = "smollm2-135m"
SIDES = ("jax_full", "jax_lora", "hf_full", "hf_lora")  # table order
LABELS = {"jax_full": "decoder_jax full", "jax_lora": "decoder_jax LoRA",
          "hf_full": "HF full", "hf_lora": "HF+PEFT LoRA"}
# LoRA first on each framework: jax's peak_bytes_in_use cannot be reset, so the smaller
# side must run before the larger one for both peaks to be its own. HF right after its
# jax counterpart, so a failed cross-check stops the run early.
RUN_ORDER = ("jax_lora", "hf_lora", "jax_full", "hf_full")
PEFT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEER_H200 = {"full": 302e3, "lora": 235e3}  # HF + PEFT, bf16, torch.compile (the issue)
TARGETS = {"full": 1.3, "lora": 1.5}  # decoder_jax / peer tokens per second
BF16_WARN = 0.05


# ---------------------------------------------------------------------------------------
# Measurement helpers


def _own_cpu() -> float:
  t = os.times()
  return t.user + t.system


class Contention:
  """How busy *other* processes kept the cores while a block ran (share of all cores)."""

  def __enter__(self):
    self.busy0, self.own0, self.t0 = busy_cpu_seconds(), _own_cpu(), time.perf_counter()
    self.others = None
    return self

  def __exit__(self, *exc):
    wall = time.perf_counter() - self.t0
    busy1, own1 = busy_cpu_seconds(), _own_cpu()
    if self.busy0 is not None and busy1 is not None and wall > 0:
      self.others = max(0.0, (busy1 - self.busy0) - (own1 - self.own0)) / (wall * cores())
    return False


def _status_bytes(field: str):
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1]) * 1024  # kB
  except OSError:
    pass
  return None


class HostPeak:
  """Growth of this process's peak RSS over a block (Linux /proc/self/status VmHWM).

  Writing 5 to /proc/self/clear_refs resets VmHWM to the current RSS, so the growth is
  the block's own peak above the RSS it started with. Where that is not allowed, it is
  how far the block pushed the process's lifetime peak up (0 if it stayed below an
  earlier side's peak); `how` says which.
  """

  def __enter__(self):
    try:
      with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
      self.reset = True
    except OSError:
      self.reset = False
    self.rss0, self.hwm0 = _status_bytes("VmRSS"), _status_bytes("VmHWM")
    self.growth = None
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


def fmt_bytes(n) -> str:
  if n is None:
    return "-"
  if n >= 2**30:
    return f"{n / 2**30:.2f} GiB"
  return f"{n / 2**20:.0f} MiB"


class _Section(dict):
  """The attribute + .get access decoder_jax.train.optimizer reads from a config section
  (avoids importing train.config_sections, which pulls in the data pipeline)."""
  __getattr__ = dict.__getitem__


# ---------------------------------------------------------------------------------------
# Shared setup: weights, adapters, batches


def model_config(args, *, lora: bool, dtype: str, param_dtype: str, attention_impl="xla"):
  from decoder_jax.model import preset
  from decoder_jax.model.config import LoraConfig
  overrides = dict(dtype=dtype, param_dtype=param_dtype, scan_layers=True,
                   remat=args.remat == "full", attention_impl=attention_impl, dropout=0.0)
  if args.num_layers:
    overrides["num_layers"] = args.num_layers
  if lora:
    overrides["lora"] = LoraConfig(rank=args.lora_rank, alpha=float(args.lora_alpha),
                                   dropout=0.0)  # targets: attn/.* and mlp/.* (all 7)
  return preset(PRESET, **overrides)


def flat(tree):
  from flax import traverse_util
  return traverse_util.flatten_dict(tree)


def cast(x, dtype):
  import jax.numpy as jnp
  return np.asarray(x).astype(jnp.dtype(dtype))  # numpy / ml_dtypes: round to nearest even


class Shared:
  """What every side starts from, on the host: float32 base weights (scanned layout), the
  LoRA adapter init, the HF state dict made from both, the token batches."""

  def __init__(self, args, want_lora: bool):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from decoder_jax import peft
    from decoder_jax.model import Decoder

    self.args = args
    t0 = time.perf_counter()
    base_config = model_config(args, lora=False, dtype="float32", param_dtype="float32")
    self.base_config = base_config
    # Initialised on JAX's CPU backend, so that on a GPU the device's peak_bytes_in_use
    # (which cannot be reset) starts with the first timed side.
    with jax.default_device(jax.devices("cpu")[0]):
      init = jax.jit(lambda k: nn.unbox(Decoder(base_config).init(
          k, jnp.zeros((1, 8), jnp.int32))["params"]))
      params = jax.device_get(init(jax.random.key(args.seed)))
      self.base = {p: np.asarray(v) for p, v in flat(params).items()}  # float32, host
      del params
      self.adapters = {}
      if want_lora:
        lora_config = model_config(args, lora=True, dtype="float32", param_dtype="float32")
        self.lora_targets = peft.check_targets(lora_config)
        full = peft.init_lora_params(lora_config, unflat(self.base),
                                     jax.random.key(args.seed + 1))
        self.adapters = {p: np.asarray(jax.device_get(v)) for p, v in flat(full).items()
                         if peft.is_lora_param(p)}
        del full
    self.n_base = sum(v.size for v in self.base.values())
    self.n_adapters = sum(v.size for v in self.adapters.values())
    self.init_s = time.perf_counter() - t0

    rs = np.random.RandomState(args.seed + 2)
    n = min(args.warmup + args.steps, 4)  # distinct batches, cycled; batch 0 is step 0's
    tokens = rs.randint(0, base_config.vocab_size, size=(n, args.batch, args.seq_len + 1))
    self.batches = [{"inputs": t[:, :-1].astype(np.int32), "targets": t[:, 1:].astype(np.int32)}
                    for t in tokens]

  # --- the HF side's tensors, through decoder_jax.interop.hf's map

  def hf_state(self):
    """{HF name: float32 numpy [out, in]} of the base weights (no lm_head: tied)."""
    from decoder_jax.interop import hf as hf_interop
    config = self.base_config
    links = hf_interop.tensor_links(config)
    where = hf_interop.unscanned_leaves(config, self.base)
    hf_interop.check_links_cover(config, links, where)
    state = {}
    for link in links:
      path, layer = where[link.ours]
      leaf = self.base[path] if layer is None else self.base[path][layer]
      state[link.hf] = np.array(link.to_hf(leaf), np.float32, order="C", copy=True)
    return state

  def hf_adapters(self):
    """{HF module name ("model.layers.3.self_attn.q_proj"): (lora_A [r, in], lora_B [out, r])}."""
    from decoder_jax.interop import hf as hf_interop
    config = self.base_config
    where = hf_interop.unscanned_leaves(config, self.base)
    out = {}
    for link in hf_interop.tensor_links(config):
      if link.ours[-1] != "kernel":
        continue
      path, layer = where[link.ours]
      a_path, b_path = path[:-1] + ("lora_a",), path[:-1] + ("lora_b",)
      if a_path not in self.adapters:
        continue
      a, b = self.adapters[a_path], self.adapters[b_path]
      if layer is not None:
        a, b = a[layer], b[layer]
      module = link.hf[:-len(".weight")]
      out[module] = (np.array(a.T, order="C", copy=True), np.array(b.T, order="C", copy=True))
    return out


def unflat(flat):
  from flax import traverse_util
  return traverse_util.unflatten_dict(flat)


# ---------------------------------------------------------------------------------------
# decoder_jax


def make_tx(args):
  import optax
  from decoder_jax.train import optimizer
  section = _Section(num_steps=args.warmup + args.steps, learning_rate=args.lr,
                     min_learning_rate=args.lr, warmup_steps=0, decay_steps=None, b1=0.9,
                     b2=0.999, eps=1e-8, weight_decay=args.weight_decay,
                     grad_clip=args.grad_clip)
  if args.grad_clip > 0:
    return optimizer.make_optimizer(section)  # clip_by_global_norm + adamw, constant lr
  return optax.adamw(args.lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=args.weight_decay)


def jax_memory(device):
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except
    stats = None
  return stats or {}


def run_jax(kind, args, shared, env):
  import jax
  import jax.numpy as jnp
  from decoder_jax import peft
  from decoder_jax.model import Decoder
  from decoder_jax.train import state as state_lib
  from decoder_jax.train import steps as steps_lib

  dtype, device = env["dtype"], jax.devices()[0]
  lora = kind == "lora"
  param_dtype = args.adapter_dtype if lora else dtype
  rec = {"side": f"jax_{kind}", "attention_impl": env["jax_attention"]}
  mem0 = jax_memory(device)

  def prepare(attention_impl):
    """Params and state on the device, then trace (timed) and XLA-compile (timed)."""
    config = model_config(args, lora=lora, dtype=dtype, param_dtype=param_dtype,
                          attention_impl=attention_impl)
    if lora:  # the adapters trainable in adapter_dtype, the base frozen in compute dtype
      full = dict(shared.base)
      full.update(shared.adapters)
      trainable, frozen = peft.split(unflat(full), peft.is_lora_param)
      trainable = jax.tree.map(lambda x: cast(x, param_dtype), trainable)
      frozen = jax.tree.map(lambda x: cast(x, dtype), frozen)
    else:
      trainable = jax.tree.map(lambda x: cast(x, param_dtype), unflat(dict(shared.base)))
      frozen = {}
    trainable, frozen = jax.device_put(trainable), jax.device_put(frozen)
    tx = make_tx(args)
    state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=trainable,
                                 opt_state=tx.init(trainable), tx=tx)
    step = jax.jit(steps_lib.make_train_step(Decoder(config), 1, dropout=False),
                   donate_argnums=(0,))
    t0 = time.perf_counter()
    # The step may return the state in other dtypes than tx.init made it: with bfloat16
    # params the gradients come out float32 (divided by the float32 token count), so the
    # Adam moments turn float32 after the first step. Start from that steady state, so
    # one compiled executable (with donation) serves every step.
    out_state, _ = jax.eval_shape(step, state, frozen, batches[0], rng)
    flat_in = jax.tree_util.tree_flatten_with_path(state)[0]
    changed = [(jax.tree_util.keystr(path), str(x.dtype), str(o.dtype))
               for (path, x), o in zip(flat_in, jax.tree.leaves(out_state)) if x.dtype != o.dtype]
    if changed:
      state = jax.tree.map(lambda x, o: x.astype(o.dtype), state, out_state)
      kinds = sorted({f"{a}->{b}" for _, a, b in changed})
      rec["state_dtype_changes"] = (f"{len(changed)} leaves ({', '.join(kinds)}), e.g. "
                                    f"{changed[0][0]}")
      print(f"  note: the step returns {len(changed)} state leaves in another dtype "
            f"({', '.join(kinds)}, e.g. {changed[0][0]}); starting from the step's output "
            f"dtypes so one executable serves every step", flush=True)
    lowered = step.lower(state, frozen, batches[0], rng)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    rec.update(trace_s=t1 - t0, compile_s=t2 - t1)
    return config, state, frozen, compiled

  batches = [jax.device_put(b) for b in shared.batches]
  rng = jax.random.key(args.seed)
  with HostPeak() as host:
    impl = env["jax_attention"]
    try:
      config, state, frozen, compiled = prepare(impl)
    except Exception as e:  # pylint: disable=broad-except
      if impl == "xla":
        raise
      print(f"  WARNING: decoder_jax {kind}: attention {impl!r} failed "
            f"({type(e).__name__}: {str(e)[:300]}); retrying with 'xla'", flush=True)
      rec["attention_impl"] = impl = "xla"
      rec["attention_fallback"] = f"{type(e).__name__}: {str(e)[:300]}"
      gc.collect()
      config, state, frozen, compiled = prepare(impl)
    n_train = sum(x.size for x in jax.tree.leaves(state.params))
    n_frozen = sum(x.size for x in jax.tree.leaves(frozen))
    rec.update(trainable=n_train, total_params=n_train + n_frozen)
    print(f"  {LABELS[rec['side']]}: {n_train:,} trainable of {n_train + n_frozen:,} params, "
          f"attention {impl}, remat {config.remat}, trace {rec['trace_s']:.1f} s + compile "
          f"{rec['compile_s']:.1f} s", flush=True)

    times, losses = [], []
    busy_timed = None
    for i in range(args.warmup + args.steps):
      if i == args.warmup:
        busy_timed = Contention().__enter__()
      batch = batches[i % len(batches)]
      t = time.perf_counter()
      state, metrics = compiled(state, frozen, batch, rng)
      jax.block_until_ready((state, metrics))
      times.append(time.perf_counter() - t)
      losses.append(metrics["loss"])
    busy_timed.__exit__(None, None, None)
    losses = [float(x) for x in losses]
    mem1 = jax_memory(device)
    del state, frozen, compiled, batches
    gc.collect()
  rec.update(timing(times, losses, args))
  rec["others_busy"] = busy_timed.others
  if env["gpu"]:
    peak0, peak1 = mem0.get("peak_bytes_in_use"), mem1.get("peak_bytes_in_use")
    rec.update(peak_bytes=peak1, memory_how="jax peak_bytes_in_use (process lifetime)",
               bytes_in_use_at_start=mem0.get("bytes_in_use"), earlier_peak=peak0,
               peak_is_upper_bound=peak0 is not None and peak1 == peak0 and peak0 > 0)
  else:
    rec.update(peak_bytes=host.growth, memory_how=host.how)
  return rec


def timing(times, losses, args):
  timed = times[args.warmup:]
  med = statistics.median(timed)
  return {"first_step_s": times[0], "step_s": timed, "warmup_step_s": times[:args.warmup],
          "ms_per_step": med * 1e3, "ms_per_step_min": min(timed) * 1e3,
          "tok_per_s": args.batch * args.seq_len / med, "losses": losses,
          "loss_first": losses[0], "loss_last": losses[-1]}


# ---------------------------------------------------------------------------------------
# Hugging Face transformers (+ PEFT)


def hf_config(shared):
  from decoder_jax.interop import hf as hf_interop
  from transformers import LlamaConfig
  values = hf_interop.config_to_hf(shared.base_config)
  values["use_cache"] = False
  config = LlamaConfig.from_dict(values, attn_implementation="sdpa")
  rope = getattr(config, "rope_parameters", None) or {}
  theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
  if theta != shared.base_config.rope_theta:
    raise RuntimeError(f"HF rope theta {theta} != {shared.base_config.rope_theta}")
  return config


def load_into_hf(model, state):
  import torch
  own = model.state_dict()
  missing = [k for k in own if k not in state and k != "lm_head.weight"]
  unknown = [k for k in state if k not in own]
  if missing or unknown:
    raise RuntimeError(f"HF state dict mismatch: missing {missing[:5]}, unknown {unknown[:5]}")
  with torch.no_grad():
    for k, v in state.items():
      if tuple(own[k].shape) != v.shape:
        raise RuntimeError(f"{k}: HF shape {tuple(own[k].shape)} vs ours {v.shape}")
      own[k].copy_(torch.from_numpy(v))  # casts to the param's dtype and device
  if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
    raise RuntimeError("HF lm_head is not tied to the embedding")


def copy_adapters_into_peft(model, adapters, dtype, device):
  """decoder_jax's adapter init into PEFT's lora_A / lora_B, in `dtype`."""
  import torch
  done = 0
  for name, p in model.named_parameters():
    for which, index in ((".lora_A.default.weight", 0), (".lora_B.default.weight", 1)):
      if name.endswith(which):
        module = name[:-len(which)]
        module = module[len("base_model.model."):] if module.startswith("base_model.model.") \
            else module
        if module not in adapters:
          raise RuntimeError(f"no decoder_jax adapter for PEFT module {module}")
        value = adapters[module][index]
        if tuple(p.shape) != value.shape:
          raise RuntimeError(f"{name}: PEFT shape {tuple(p.shape)} vs ours {value.shape}")
        with torch.no_grad():
          p.data = torch.from_numpy(value).to(device=device, dtype=dtype)
        done += 1
  if done != 2 * len(adapters):
    raise RuntimeError(f"copied {done} PEFT adapter tensors, expected {2 * len(adapters)}")


def enable_checkpointing(model):
  kwargs = {"use_reentrant": False}  # works with a frozen base (PEFT) without input grads
  if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
    model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
  else:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def run_hf(kind, args, shared, env, hf_cfg, hf_state):
  import torch
  from transformers import LlamaForCausalLM

  device = torch.device(env["torch_device"])
  cuda = device.type == "cuda"
  dtype = getattr(torch, env["dtype"])
  lora = kind == "lora"
  rec = {"side": f"hf_{kind}", "torch_compile": bool(args.torch_compile)}

  def sync():
    if cuda:
      torch.cuda.synchronize()

  if cuda:
    torch.cuda.empty_cache()
    sync()
    torch.cuda.reset_peak_memory_stats(device)
    rec["bytes_in_use_at_start"] = torch.cuda.memory_allocated(device)
  with HostPeak() as host:
    torch.manual_seed(args.seed)
    with torch.device(device):
      model = LlamaForCausalLM(hf_cfg)
    model.to(dtype=dtype)
    load_into_hf(model, hf_state)
    rec["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    if args.remat == "full":
      enable_checkpointing(model)
    if lora:
      from peft import LoraConfig, get_peft_model
      peft_config = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                               target_modules=list(PEFT_TARGETS), bias="none",
                               task_type="CAUSAL_LM")
      model = get_peft_model(model, peft_config, autocast_adapter_dtype=True)
      copy_adapters_into_peft(model, shared.hf_adapters(), getattr(torch, args.adapter_dtype),
                              device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    rec["trainable"] = sum(p.numel() for p in params)
    rec["total_params"] = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=args.weight_decay, fused=True if cuda else None)
    rec["optimizer"] = "AdamW fused" if cuda else "AdamW (foreach default)"
    forward = model
    if args.torch_compile:
      forward = torch.compile(model, mode=args.torch_compile_mode)
    batches = [{k: torch.from_numpy(v.astype(np.int64)).to(device) for k, v in b.items()}
               for b in shared.batches]
    print(f"  {LABELS[rec['side']]}: {rec['trainable']:,} trainable of "
          f"{rec['total_params']:,} params, attention {rec['attn_implementation']}, "
          f"torch.compile {'on' if args.torch_compile else 'off'}, gradient checkpointing "
          f"{'on' if args.remat == 'full' else 'off'}, {rec['optimizer']}", flush=True)

    def train_step(batch):
      out = forward(input_ids=batch["inputs"], labels=batch["targets"],
                    shift_labels=batch["targets"], use_cache=False)  # no shift: all positions
      out.loss.backward()
      if args.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
      opt.step()
      opt.zero_grad(set_to_none=True)
      return out.loss.detach()

    times, losses = [], []
    busy_timed = None
    for i in range(args.warmup + args.steps):
      if i == args.warmup:
        busy_timed = Contention().__enter__()
      batch = batches[i % len(batches)]
      sync()
      t = time.perf_counter()
      try:
        loss = train_step(batch)
      except Exception as e:  # pylint: disable=broad-except
        if i > 0 or not args.torch_compile:
          raise
        print(f"  WARNING: {LABELS[rec['side']]}: torch.compile failed ({type(e).__name__}: "
              f"{str(e)[:300]}); running eager", flush=True)
        rec["torch_compile"] = False
        rec["torch_compile_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        opt.zero_grad(set_to_none=True)
        forward = model
        sync()
        t = time.perf_counter()
        loss = train_step(batch)
      sync()
      times.append(time.perf_counter() - t)
      losses.append(loss)
    busy_timed.__exit__(None, None, None)
    losses = [float(x) for x in losses]
    del model, forward, opt, params, batches, loss
    gc.collect()
  rec.update(timing(times, losses, args))
  rec["others_busy"] = busy_timed.others
  if cuda:
    rec.update(peak_bytes=torch.cuda.max_memory_allocated(device),
               peak_reserved_bytes=torch.cuda.max_memory_reserved(device),
               memory_how="torch.cuda.max_memory_allocated (reset per side)")
    torch.cuda.empty_cache()
  else:
    rec.update(peak_bytes=host.growth, memory_how=host.how)
  return rec


# ---------------------------------------------------------------------------------------


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--seq_len", type=int, default=512)
  ap.add_argument("--steps", type=int, default=10, help="timed steps per side")
  ap.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
  ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                  help="compute dtype of every side, parameter dtype of the full rows and of "
                  "the frozen LoRA base (auto: bfloat16 on a GPU, float32 on CPU)")
  ap.add_argument("--adapter_dtype", default="float32", choices=("float32", "bfloat16"),
                  help="dtype of the LoRA adapters and their optimizer state on both sides "
                  "(float32: what PEFT's default autocast_adapter_dtype=True keeps)")
  ap.add_argument("--sides", default=",".join(SIDES),
                  help=f"comma list of {', '.join(SIDES)} (also: all, jax, hf, full, lora)")
  ap.add_argument("--remat", default="none", choices=("none", "full"),
                  help="full: decoder_jax remat of every block, HF gradient checkpointing")
  ap.add_argument("--torch_compile", action=argparse.BooleanOptionalAction, default=None,
                  help="torch.compile the HF model (default: on with CUDA, off on CPU)")
  ap.add_argument("--torch_compile_mode", default=None,
                  help="torch.compile mode, e.g. max-autotune (default: torch's default)")
  ap.add_argument("--jax_attention", default="auto", choices=("auto", "xla", "cudnn"),
                  help="decoder_jax attention_impl (auto: cudnn on a GPU in bfloat16, else "
                  "xla; a cudnn compile failure falls back to xla with a warning)")
  ap.add_argument("--lora_rank", type=int, default=16)
  ap.add_argument("--lora_alpha", type=int, default=32)
  ap.add_argument("--lr", type=float, default=1e-4)
  ap.add_argument("--weight_decay", type=float, default=0.0)
  ap.add_argument("--grad_clip", type=float, default=1.0, help="global-norm clip, both sides "
                  "(0: none)")
  ap.add_argument("--loss_tol", type=float, default=1e-3,
                  help="float32 first-step loss agreement required across sides")
  ap.add_argument("--num_layers", type=int, default=0,
                  help="override the preset's 30 layers (smoke tests only)")
  ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--json_out", default=None)
  ap.add_argument("--report", nargs="+", default=None, metavar="JSON",
                  help="print the summary and table from earlier --json_out files (e.g. the "
                  "jax and hf sides run apart) and exit; runs nothing")
  ap.add_argument("--table_out", default=None,
                  help="append a markdown section (date, hardware, versions, command, table) "
                  "to this file, e.g. benchmarks/RESULTS.md")
  args = ap.parse_args(argv)
  groups = {"all": SIDES, "jax": ("jax_full", "jax_lora"), "hf": ("hf_full", "hf_lora"),
            "full": ("jax_full", "hf_full"), "lora": ("jax_lora", "hf_lora")}
  wanted = []
  for s in (x.strip() for x in args.sides.split(",") if x.strip()):
    s = s.replace("-", "_")
    if s in groups:
      wanted += groups[s]
    elif s in SIDES:
      wanted.append(s)
    else:
      ap.error(f"--sides: unknown {s!r}; use {', '.join(SIDES)} or {', '.join(groups)}")
  args.sides = [s for s in SIDES if s in wanted]
  if not args.sides or args.batch < 1 or args.seq_len < 2 or args.steps < 1 or args.warmup < 0:
    ap.error("need some --sides, --batch >= 1, --seq_len >= 2, --steps >= 1, --warmup >= 0")
  return args


def check_losses(results, env, args, final=False):
  """Step-0 losses of every decoder_jax row against every HF row (same batch, same
  weights, adapters a no-op). Aborts in float32 when they disagree by more than loss_tol."""
  jax_rows = [r for r in results if r["side"].startswith("jax")]
  hf_rows = [r for r in results if r["side"].startswith("hf")]
  pairs = []
  for j in jax_rows:
    for h in hf_rows:
      pairs.append((j["side"], h["side"], j["loss_first"], h["loss_first"],
                    abs(j["loss_first"] - h["loss_first"])))
  if len(jax_rows) == 2:  # within decoder_jax too
    a, b = jax_rows
    pairs.append((a["side"], b["side"], a["loss_first"], b["loss_first"],
                  abs(a["loss_first"] - b["loss_first"])))
  float32 = env["dtype"] == "float32"
  tol = args.loss_tol if float32 else BF16_WARN
  bad = [p for p in pairs if not p[4] <= tol]  # NaN counts as bad
  if final:
    return pairs
  printed = env.setdefault("_printed_pairs", set())
  new = [p for p in pairs if (p[0], p[1]) not in printed]
  bad = [p for p in bad if p in new]
  for a, b, la, lb, d in new:
    printed.add((a, b))
    print(f"  cross-check step-0 loss: {LABELS[a]} {la:.6f} vs {LABELS[b]} {lb:.6f}: "
          f"|diff| {d:.2e} ({'ok' if d <= tol else 'MISMATCH'}, tol {tol:g}"
          f"{'' if float32 else ', bf16 warning only'})", flush=True)
  if bad and float32:
    a, b, la, lb, d = bad[0]
    raise SystemExit(
        f"\nABORT: first-step losses disagree in float32: {LABELS[a]} {la:.6f} vs {LABELS[b]} "
        f"{lb:.6f} (|diff| {d:.3e} > --loss_tol {args.loss_tol:g}). Both sides start from "
        f"the same weights on the same batch, so the models or the losses differ: the "
        f"throughput figures would not compare like with like.")
  if bad:
    print(f"  WARNING: bf16 first-step losses differ by more than {BF16_WARN}: "
          f"{[(p[0], p[1], round(p[4], 4)) for p in bad]}", flush=True)
  return pairs


def report(args):
  """Summary and table from --json_out files; later files' rows replace earlier ones."""
  by, env, run_args = {}, None, None
  for path in args.report:
    with open(path) as f:
      data = json.load(f)
    e, a = data["env"], data["args"]
    print(f"{path}: sides {[r['side'] for r in data['results']]}, {e['dtype']}, "
          f"{e['jax_device'] if e['gpu'] else e['cpu']}, batch {a['batch']} x {a['seq_len']}, "
          f"{e['date_utc']} UTC, command: {e['command']}")
    if env is not None and (e["dtype"], e["gpu"], a["batch"], a["seq_len"], a["remat"]) != (
        env["dtype"], env["gpu"], run_args.batch, run_args.seq_len, run_args.remat):
      print(f"  WARNING: {path} differs from the first file in dtype, device, shapes or remat")
    env = env or e
    run_args = run_args or argparse.Namespace(**a)
    by.update({r["side"]: r for r in data["results"]})
  results = [by[s] for s in SIDES if s in by]
  run_args.loss_tol = args.loss_tol
  lines = summary_lines({r["side"]: r for r in results}, env, run_args)
  print("\n## summary")
  print("\n".join(lines))
  if args.table_out:
    env = dict(env, command=env["command"] + "  (+ " + "python " + shlex.join(sys.argv) + ")")
    append_table(args.table_out, results, run_args, env, lines)
    print(f"appended a section to {args.table_out}")
  print_table(results, run_args, env)


def main(argv=None):
  args = parse_args(argv)
  if args.report:
    return report(args)
  import jax
  backend = jax.default_backend()
  gpu = backend == "gpu"
  need_hf = any(s.startswith("hf") for s in args.sides)
  torch = None
  if need_hf:
    import torch
    torch_cuda = torch.cuda.is_available()
    if gpu != torch_cuda:
      raise SystemExit(
          f"ABORT: JAX runs on {backend!r} but torch {torch.__version__} "
          f"{'has' if torch_cuda else 'has no'} CUDA: the HF rows would run on another "
          "device than decoder_jax. Install a matching torch build (or jax), or pass "
          "--sides jax / --sides hf.")
    torch.set_num_threads(args.threads or cores())
  if args.torch_compile is None:
    args.torch_compile = gpu
  dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if gpu else "float32")
  jax_attention = args.jax_attention
  if jax_attention == "auto":
    jax_attention = "cudnn" if gpu and dtype == "bfloat16" else "xla"

  num_cores = cores()
  device = jax.devices()[0]
  env = {
      "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
      "python": platform.python_version(), "platform": platform.platform(),
      "cpu": cpu_name(), "cores": num_cores, "jax": version("jax"), "jaxlib": version("jaxlib"),
      "flax": version("flax"), "optax": version("optax"),
      "torch": torch.__version__ if torch else version("torch"),
      "transformers": version("transformers"), "peft": version("peft"),
      "jax_backend": backend, "jax_device": getattr(device, "device_kind", str(device)),
      "torch_device": ("cuda" if gpu else "cpu") if need_hf else None,
      "gpu": gpu, "dtype": dtype, "adapter_dtype": args.adapter_dtype,
      "jax_attention": jax_attention, "torch_compile": args.torch_compile,
      "remat": args.remat, "loadavg_start": os.getloadavg(),
      "command": "python " + shlex.join(sys.argv),
  }
  for plugin in ("jax-cuda12-plugin", "jax-cuda13-plugin"):
    if version(plugin) != "not installed":
      env[plugin] = version(plugin)
  if need_hf:
    env["torch_threads"] = torch.get_num_threads()
    if gpu:
      env["torch_gpu"] = torch.cuda.get_device_name(0)
      env["torch_cuda"] = torch.version.cuda
  print("# fine-tuning step benchmark: SmolLM2-135M architecture, random weights")
  for k, v in env.items():
    print(f"  {k}: {v}")
  print(f"  batch {args.batch} x seq_len {args.seq_len} = {args.batch * args.seq_len:,} tokens "
        f"per step; {args.warmup} warm-up + {args.steps} timed steps per side; AdamW lr "
        f"{args.lr:g}, wd {args.weight_decay:g}, clip {args.grad_clip:g}; LoRA r "
        f"{args.lora_rank}, alpha {args.lora_alpha}, dropout 0; sides {args.sides}", flush=True)

  want_lora = any(s.endswith("lora") for s in args.sides)
  shared = Shared(args, want_lora)
  print(f"  weights: {shared.n_base:,} base params (+{shared.n_adapters:,} LoRA), "
        f"{shared.base_config.num_layers} layers, init {shared.init_s:.1f} s", flush=True)
  hf_cfg = hf_state = None
  if need_hf:
    hf_cfg, hf_state = hf_config(shared), shared.hf_state()

  results = []
  for side in RUN_ORDER:
    if side not in args.sides:
      continue
    framework, kind = side.split("_")
    print(f"\n## {LABELS[side]}", flush=True)
    if framework == "jax":
      rec = run_jax(kind, args, shared, env)
    else:
      rec = run_hf(kind, args, shared, env, hf_cfg, hf_state)
    print(f"  first step {rec['first_step_s']:.2f} s; timed steps "
          f"{', '.join(f'{t * 1e3:.1f}' for t in rec['step_s'])} ms; median "
          f"{rec['ms_per_step']:.1f} ms = {rec['tok_per_s']:,.0f} tok/s; peak memory "
          f"{fmt_bytes(rec['peak_bytes'])} ({rec['memory_how']}); losses "
          f"{', '.join(f'{x:.4f}' for x in rec['losses'])}", flush=True)
    results.append(rec)
    try:
      check_losses(results, env, args)
    except SystemExit as e:
      print(str(e), flush=True)
      print_table(results, args, env)
      _write_json(args, env, results, {"aborted": str(e)})
      raise SystemExit(2) from None

  checks = {"step0_loss_pairs": [
      {"a": a, "b": b, "loss_a": la, "loss_b": lb, "abs_diff": d}
      for a, b, la, lb, d in check_losses(results, env, args, final=True)]}
  by = {r["side"]: r for r in results}
  if "jax_lora" in by and "hf_lora" in by and by["jax_lora"]["trainable"] != \
      by["hf_lora"]["trainable"]:
    print(f"  WARNING: trainable LoRA params differ: decoder_jax "
          f"{by['jax_lora']['trainable']:,} vs PEFT {by['hf_lora']['trainable']:,}")
  lines = summary_lines(by, env, args)
  print("\n## summary")
  print("\n".join(lines))
  _write_json(args, env, results, checks)
  if args.table_out:
    append_table(args.table_out, results, args, env, lines)
    print(f"appended a section to {args.table_out}")
  print_table(results, args, env)


def _verdict(met, env):
  if not env["gpu"]:
    return "n/a, not a GPU run"
  return "met" if met else "not met"


def summary_lines(by, env, args):
  lines = []
  for kind in ("full", "lora"):
    j, h = by.get(f"jax_{kind}"), by.get(f"hf_{kind}")
    if j and h:
      ratio = j["tok_per_s"] / h["tok_per_s"]
      lines.append(f"- {kind}: decoder_jax / {LABELS[f'hf_{kind}']} tokens/s = **{ratio:.2f}x** "
                   f"({j['tok_per_s']:,.0f} vs {h['tok_per_s']:,.0f}; target >= "
                   f"{TARGETS[kind]}x on an H200: "
                   f"{_verdict(ratio >= TARGETS[kind], env)}); "
                   f"peak memory {fmt_bytes(j['peak_bytes'])} vs {fmt_bytes(h['peak_bytes'])}")
  for fw, name in (("jax", "decoder_jax"), ("hf", "HF")):
    f, l = by.get(f"{fw}_full"), by.get(f"{fw}_lora")
    if f and l:
      faster = l["tok_per_s"] > f["tok_per_s"]
      lines.append(f"- {name} LoRA faster than full: **{'yes' if faster else 'no'}** (LoRA / "
                   f"full tokens/s = {l['tok_per_s'] / f['tok_per_s']:.2f})")
  for kind in ("full", "lora"):
    h = by.get(f"hf_{kind}")
    if h:
      lines.append(f"- peer reference ({kind}, H200, bf16, torch.compile, from the issue): "
                   f"{PEER_H200[kind]:,.0f} tok/s; this run's {LABELS[f'hf_{kind}']}: "
                   f"{h['tok_per_s']:,.0f} tok/s")
  for side in ("jax_full", "jax_lora"):
    if by.get(side, {}).get("state_dtype_changes"):
      lines.append(f"- {LABELS[side]}: the train step returns {by[side]['state_dtype_changes']}; "
                   f"timed from that steady state")
  pairs = check_losses(list(by.values()), env, args, final=True)
  if pairs:
    worst = max(p[4] for p in pairs)
    lines.append(f"- cross-check: step-0 losses of all rows agree to {worst:.1e} "
                 f"({env['dtype']}, same weights and batch)")
  j, h = by.get("jax_full"), by.get("hf_full")
  jl, hl = by.get("jax_lora"), by.get("hf_lora")
  last = [f"{kind} {a['loss_last']:.4f} vs {b['loss_last']:.4f}"
          for kind, a, b in (("full", j, h), ("LoRA", jl, hl)) if a and b]
  if last:
    lines.append(f"- loss after the last step, decoder_jax vs HF (same weights, batches and "
                 f"optimizer; informational): {'; '.join(last)}")
  return lines


def _write_json(args, env, results, checks):
  if not args.json_out:
    return
  env = {k: v for k, v in env.items() if not k.startswith("_")}
  with open(args.json_out, "w") as f:
    json.dump({"env": env, "args": vars(args), "results": results, "checks": checks}, f,
              indent=2, default=str)
  print(f"wrote {args.json_out}")


def _table_lines(results, args, env):
  mem = ("peak device memory" if env["gpu"] else "peak RSS growth")
  head = [f"| side | ms/step (median) | tokens/s | trainable params | {mem} | "
          "trace + compile s | first step s | loss step 0 -> last | others busy |",
          "|---|---:|---:|---:|---:|---:|---:|---|---:|"]
  rows = []
  by = {r["side"]: r for r in results}
  for side in SIDES:
    r = by.get(side)
    if r is None:
      continue
    compile_cell = (f"{r['trace_s']:.1f} + {r['compile_s']:.1f}" if "compile_s" in r else
                    ("(in first step)" if r.get("torch_compile") else "-"))
    peak = fmt_bytes(r["peak_bytes"])
    if r.get("peak_is_upper_bound"):
      peak = "<= " + peak
    busy = "?" if r.get("others_busy") is None else f"{r['others_busy']:.0%}"
    name = LABELS[side]
    if side.startswith("hf") and r.get("torch_compile"):
      name += " (compiled)"
    rows.append(f"| {name} | {r['ms_per_step']:.1f} | {r['tok_per_s']:,.0f} | "
                f"{r['trainable']:,} ({100 * r['trainable'] / r['total_params']:.2f}%) | "
                f"{peak} | {compile_cell} | {r['first_step_s']:.2f} | "
                f"{r['loss_first']:.4f} -> {r['loss_last']:.4f} | {busy} |")
  return head + rows


def _note(env):
  how = ("jax: peak_bytes_in_use of the device (process lifetime, cannot be reset: LoRA "
         "runs first; '<=' marks a side that stayed under an earlier peak); torch: "
         "max_memory_allocated, reset per side" if env["gpu"] else
         "growth of the process's peak RSS (VmHWM) over each side, setup and compile "
         "included; on CPU both frameworks' buffers are host memory")
  return (f"ms/step: median of the timed steps, each timed alone (jax: block_until_ready on "
          f"state + metrics; torch: cuda synchronize on a GPU). Memory: {how}. 'others busy': "
          f"share of all cores used by other processes during the timed steps.")


def print_table(results, args, env):
  hw = (f"{env['jax_device']}" if env["gpu"] else f"{env['cpu']}, {env['cores']} cores")
  print(f"\n## results ({env['dtype']}, {hw}, batch {args.batch} x {args.seq_len}, "
        f"median of {args.steps} steps after {args.warmup} warm-up, remat {args.remat}, "
        f"torch.compile {'on' if args.torch_compile else 'off'})\n")
  print("\n".join(_table_lines(results, args, env)))
  print("\n" + _note(env))


def append_table(path, results, args, env, lines):
  hw = (f"{env['jax_device']} (torch: {env.get('torch_gpu', '-')}, CUDA "
        f"{env.get('torch_cuda', '-')})" if env["gpu"] else
        f"{env['cpu']}, {env['cores']} cores (CPU)")
  versions = (f"python {env['python']}, jax/jaxlib {env['jax']}/{env['jaxlib']}, flax "
              f"{env['flax']}, optax {env['optax']}, torch {env['torch']}, transformers "
              f"{env['transformers']}, peft {env['peft']}")
  plugins = [f"{k} {env[k]}" for k in ("jax-cuda12-plugin", "jax-cuda13-plugin") if k in env]
  if plugins:
    versions += ", " + ", ".join(plugins)
  text = [
      "", f"## Fine-tuning step throughput, SmolLM2-135M architecture ({env['date_utc']} UTC)",
      "",
      f"`{env['command']}`", "",
      f"Hardware: {hw}. Versions: {versions}. {env['dtype']} compute (LoRA adapters "
      f"{env['adapter_dtype']}), batch {args.batch} x {args.seq_len}, median of {args.steps} "
      f"timed steps after {args.warmup} warm-up, remat {args.remat}, decoder_jax attention "
      f"{env['jax_attention']}, torch.compile {'on' if args.torch_compile else 'off'}, "
      f"AdamW lr {args.lr:g}, clip {args.grad_clip:g}, LoRA r {args.lora_rank} alpha "
      f"{args.lora_alpha} on q/k/v/o/gate/up/down.", "",
  ] + _table_lines(results, args, env) + ["", _note(env), ""] + lines
  with open(path, "a") as f:
    f.write("\n".join(text) + "\n")


if __name__ == "__main__":
  sys.exit(main())
