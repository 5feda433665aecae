"""Fine-tuning step throughput, side by side: decoder_jax vs. Hugging Face transformers + PEFT.

Full fine-tuning and LoRA (rank 16, alpha 32, every attention and MLP projection) steps on
the SmolLM2-135M architecture with random weights, all four rows in one process on the same
weights and batches; what each row runs and reports: benchmarks/README.md.

  python benchmarks/finetune.py                                  # H200: bf16, torch.compile
  python benchmarks/finetune.py --batch 2 --seq_len 64 --steps 2 --warmup 1   # CPU smoke run
  python benchmarks/finetune.py --sides jax --json_out /tmp/jax.json   # one framework, then
  python benchmarks/finetune.py --report /tmp/jax.json /tmp/hf.json    # ... one table
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# One process holds both frameworks: JAX must not take 75% of the GPU up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import numpy as np  # pylint: disable=wrong-import-position

import common  # pylint: disable=wrong-import-position

PRESET = "smollm2-135m"
SIDES = ("jax_full", "jax_lora", "hf_full", "hf_lora")  # table order
LABELS = {"jax_full": "decoder_jax full", "jax_lora": "decoder_jax LoRA",
          "hf_full": "HF full", "hf_lora": "HF+PEFT LoRA"}
# LoRA first on each framework: jax's peak_bytes_in_use cannot be reset, so the smaller
# side must run first for both peaks to be its own. HF right after its jax counterpart, so
# a failed cross-check stops the run early.
RUN_ORDER = ("jax_lora", "hf_lora", "jax_full", "hf_full")
PEFT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEER_H200 = {"full": 302e3, "lora": 235e3}  # HF + PEFT, bf16, torch.compile (the issue)
TARGETS = {"full": 1.3, "lora": 1.5}  # decoder_jax / peer tokens per second
BF16_WARN = 0.05
DISTS = ("flax", "optax", "torch", "transformers", "peft")


def model_config(args, *, lora: bool, dtype: str, param_dtype: str, attention_impl="xla"):
  from decoder_jax.model import preset
  from decoder_jax.model.config import LoraConfig
  overrides = dict(dtype=dtype, param_dtype=param_dtype, scan_layers=True, dropout=0.0,
                   remat=args.remat, attention_impl=attention_impl)
  if args.num_layers:
    overrides["num_layers"] = args.num_layers
  if lora:  # default targets attn/.* and mlp/.*: all seven projections
    overrides["lora"] = LoraConfig(rank=args.lora_rank, alpha=float(args.lora_alpha), dropout=0.0)
  return preset(PRESET, **overrides)


class Shared:
  """What every side starts from, on the host: float32 base weights (scanned layout), the
  LoRA adapter init, the token batches (batch 0 is step 0's)."""

  def __init__(self, args, want_lora: bool):
    import jax
    from decoder_jax import peft
    t0 = time.perf_counter()
    self.base_config = model_config(args, lora=False, dtype="float32", param_dtype="float32")
    self.base = common.init_params(self.base_config, args.seed)
    self.adapters = {}
    if want_lora:
      lora_config = model_config(args, lora=True, dtype="float32", param_dtype="float32")
      peft.check_targets(lora_config)
      with jax.default_device(jax.devices("cpu")[0]):
        full = peft.init_lora_params(lora_config, common.unflat(self.base),
                                     jax.random.key(args.seed + 1))
        self.adapters = {p: np.asarray(v) for p, v in
                         common.flat(full).items() if peft.is_lora_param(p)}
    self.n_base = sum(v.size for v in self.base.values())
    self.n_adapters = sum(v.size for v in self.adapters.values())
    self.init_s = time.perf_counter() - t0
    self.batches = common.random_batches(self.base_config.vocab_size, args.batch, args.seq_len,
                                         min(args.warmup + args.steps, 4), args.seed + 2)

  def hf_adapters(self):
    """{HF module ("model.layers.3.self_attn.q_proj"): (lora_A [r, in], lora_B [out, r])}."""
    from decoder_jax.interop import hf as hf_interop
    where = hf_interop.unscanned_leaves(self.base_config, self.base)
    out = {}
    for link in hf_interop.tensor_links(self.base_config):
      path, layer = where[link.ours]
      a_path, b_path = path[:-1] + ("lora_a",), path[:-1] + ("lora_b",)
      if link.ours[-1] != "kernel" or a_path not in self.adapters:
        continue
      a, b = self.adapters[a_path], self.adapters[b_path]  # [in, r], [r, out] (per layer)
      if layer is not None:
        a, b = a[layer], b[layer]
      out[link.hf.removesuffix(".weight")] = (np.ascontiguousarray(a.T),
                                              np.ascontiguousarray(b.T))
    return out


def run_jax(kind, args, shared, env):
  import jax
  import jax.numpy as jnp
  from decoder_jax import peft
  from decoder_jax.model import Decoder
  from decoder_jax.train import state as state_lib
  dtype, lora = env["dtype"], kind == "lora"
  param_dtype = args.adapter_dtype if lora else dtype

  def prepare(impl, batch, rng):
    config = model_config(args, lora=lora, dtype=dtype, param_dtype=param_dtype,
                          attention_impl=impl)
    params = common.unflat({**shared.base, **shared.adapters} if lora else shared.base)
    trainable, frozen = peft.split(params, peft.is_lora_param) if lora else (params, {})
    # Adapters train in adapter_dtype; the frozen base is held in the compute dtype, as
    # train.frozen_dtype does in the training loop.
    trainable = jax.device_put(jax.tree.map(lambda x: common.cast(x, param_dtype), trainable))
    frozen = jax.device_put(jax.tree.map(lambda x: common.cast(x, dtype), frozen))
    tx = common.make_tx(args.lr, args.weight_decay, args.grad_clip)
    state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=trainable,
                                 opt_state=tx.init(trainable), tx=tx)
    state, compiled, info = common.compile_train_step(Decoder(config), state, frozen, batch, rng)
    return state, frozen, compiled, dict(info, remat=config.remat)

  return common.jax_side({"side": f"jax_{kind}"}, prepare, env["jax_attention"], shared.batches,
                         args.seed, args.warmup, args.steps)


def copy_adapters_into_peft(model, adapters, dtype):
  """decoder_jax's adapter init into PEFT's lora_A / lora_B, in `dtype`."""
  import torch
  done = 0
  for name, p in model.named_parameters():
    for which, index in ((".lora_A.default.weight", 0), (".lora_B.default.weight", 1)):
      if name.endswith(which):
        value = adapters[name.removesuffix(which).removeprefix("base_model.model.")][index]
        if tuple(p.shape) != value.shape:
          raise RuntimeError(f"{name}: PEFT shape {tuple(p.shape)} vs ours {value.shape}")
        p.data = torch.from_numpy(value).to(device=p.device, dtype=dtype)
        done += 1
  if done != 2 * len(adapters):
    raise RuntimeError(f"copied {done} PEFT adapter tensors, expected {2 * len(adapters)}")


def run_hf(kind, args, shared, env, hf_state):
  import torch

  def build():
    torch.manual_seed(args.seed)
    model = common.hf_model(shared.base_config, env["torch_device"], use_cache=False)
    model.to(dtype=getattr(torch, env["dtype"]))
    common.load_into_hf(model, hf_state)
    if args.remat == "full":
      common.enable_checkpointing(model)
    if kind == "lora":
      from peft import LoraConfig, get_peft_model
      model = get_peft_model(model, LoraConfig(
          r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=0.0, bias="none",
          target_modules=list(PEFT_TARGETS), task_type="CAUSAL_LM"), autocast_adapter_dtype=True)
      copy_adapters_into_peft(model, shared.hf_adapters(), getattr(torch, args.adapter_dtype))
    model.train()
    return common.HfTrainer(model, lr=args.lr, weight_decay=args.weight_decay,
                            grad_clip=args.grad_clip, compile=args.torch_compile,
                            compile_mode=args.torch_compile_mode)

  return common.hf_side({"side": f"hf_{kind}"}, build, shared.batches, args.warmup, args.steps)


def loss_pairs(results):
  """(side, side, loss, loss, |diff|) of the step-0 losses: every decoder_jax row against
  every HF row, and the two decoder_jax rows against each other."""
  jax_rows = [r for r in results if r["side"].startswith("jax")]
  pairs = [(j, h) for j in jax_rows for h in results if h["side"].startswith("hf")]
  pairs += [tuple(jax_rows)] if len(jax_rows) == 2 else []
  return [(a["side"], b["side"], a["loss_first"], b["loss_first"],
           abs(a["loss_first"] - b["loss_first"])) for a, b in pairs]


def check_losses(results, env, args, printed):
  """Same weights, same batch, fresh adapters a no-op: the step-0 losses must agree. In
  float32 a pair apart by more than --loss_tol ends the run (SystemExit); in bf16 it warns."""
  float32 = env["dtype"] == "float32"
  tol = args.loss_tol if float32 else BF16_WARN
  bad = []
  for a, b, la, lb, d in loss_pairs(results):
    if (a, b) in printed:
      continue
    printed.add((a, b))
    print(f"  cross-check step-0 loss: {LABELS[a]} {la:.6f} vs {LABELS[b]} {lb:.6f}: |diff| "
          f"{d:.2e} ({'ok' if d <= tol else 'MISMATCH'}, tol {tol:g}"
          f"{'' if float32 else ', bf16 warning only'})", flush=True)
    if not d <= tol:  # NaN counts as bad
      bad.append((a, b, la, lb, d))
  if bad and float32:
    a, b, la, lb, d = bad[0]
    raise SystemExit(
        f"\nABORT: first-step losses disagree in float32: {LABELS[a]} {la:.6f} vs {LABELS[b]} "
        f"{lb:.6f} (|diff| {d:.3e} > --loss_tol {args.loss_tol:g}). Both sides start from the "
        "same weights on the same batch, so the models or the losses differ: the throughput "
        "figures would not compare like with like.")
  if bad:
    print(f"  WARNING: bf16 first-step losses differ by more than {BF16_WARN}: "
          f"{[(p[0], p[1], round(p[4], 4)) for p in bad]}", flush=True)


def summary_lines(by, env):
  lines = []
  for kind in ("full", "lora"):
    j, h = by.get(f"jax_{kind}"), by.get(f"hf_{kind}")
    if j and h:
      ratio = j["tok_per_s"] / h["tok_per_s"]
      lines.append(f"- {kind}: decoder_jax / {LABELS[f'hf_{kind}']} tokens/s = **{ratio:.2f}x** "
                   f"({j['tok_per_s']:,.0f} vs {h['tok_per_s']:,.0f}; target >= {TARGETS[kind]}x "
                   f"on an H200: {common.verdict(ratio >= TARGETS[kind], env)}); peak memory "
                   f"{common.fmt_bytes(j['peak_bytes'])} vs {common.fmt_bytes(h['peak_bytes'])}")
  for fw, name in (("jax", "decoder_jax"), ("hf", "HF")):
    f, l = by.get(f"{fw}_full"), by.get(f"{fw}_lora")
    if f and l:
      lines.append(f"- {name} LoRA faster than full: **"
                   f"{'yes' if l['tok_per_s'] > f['tok_per_s'] else 'no'}** (LoRA / full "
                   f"tokens/s = {l['tok_per_s'] / f['tok_per_s']:.2f})")
  for kind in ("full", "lora"):
    if f"hf_{kind}" in by:
      lines.append(f"- peer reference ({kind}, H200, bf16, torch.compile, from the issue): "
                   f"{PEER_H200[kind]:,.0f} tok/s; this run's {LABELS[f'hf_{kind}']}: "
                   f"{by[f'hf_{kind}']['tok_per_s']:,.0f} tok/s")
  for side in ("jax_full", "jax_lora"):
    if by.get(side, {}).get("state_dtype_note"):
      lines.append(f"- {LABELS[side]}: {by[side]['state_dtype_note']} (that steady state)")
  pairs = loss_pairs(list(by.values()))
  if pairs:
    lines.append(f"- cross-check: step-0 losses of all rows agree to "
                 f"{max(p[4] for p in pairs):.1e} ({env['dtype']}, same weights and batch)")
  last = [f"{kind} {by[j]['loss_last']:.4f} vs {by[h]['loss_last']:.4f}"
          for kind, j, h in (("full", "jax_full", "hf_full"), ("LoRA", "jax_lora", "hf_lora"))
          if j in by and h in by]
  if last:
    lines.append("- loss after the last step, decoder_jax vs HF (same weights, batches and "
                 f"optimizer; informational): {'; '.join(last)}")
  return lines


def table_lines(results, env):
  rows = []
  for r in sorted(results, key=lambda r: SIDES.index(r["side"])):
    compile_cell = (f"{r['trace_s']:.1f} + {r['compile_s']:.1f}" if "compile_s" in r else
                    "(in first step)" if r.get("torch_compile") else "-")
    peak = ("<= " if r.get("peak_is_upper_bound") else "") + common.fmt_bytes(r["peak_bytes"])
    name = LABELS[r["side"]] + (" (compiled)" if r["side"].startswith("hf") and
                                r.get("torch_compile") else "")
    rows.append([name, f"{r['ms_per_step']:.1f}", f"{r['tok_per_s']:,.0f}",
                 f"{r['trainable']:,} ({100 * r['trainable'] / r['total_params']:.2f}%)", peak,
                 compile_cell, f"{r['first_step_s']:.2f}",
                 f"{r['loss_first']:.4f} -> {r['loss_last']:.4f}",
                 common.busy_cells([r.get("others_busy")])])
  mem = "peak device memory" if env["gpu"] else "peak RSS growth"
  return common.md_table(["side", "ms/step (median)", "tokens/s", "trainable params", mem,
                          "trace + compile s", "first step s", "loss step 0 -> last",
                          "others busy"], rows, right=(1, 2, 3, 4, 5, 6, 8))


def note(env):
  how = ("jax: peak_bytes_in_use of the device (process lifetime, cannot be reset: LoRA runs "
         "first; '<=' marks a side that stayed under an earlier peak); torch: "
         "max_memory_allocated, reset per side" if env["gpu"] else
         "growth of the process's peak RSS (VmHWM) over each side, setup and compile "
         "included; on CPU both frameworks' buffers are host memory")
  return (f"ms/step: median of the timed steps, each timed alone (jax: block_until_ready on "
          f"state + metrics; torch: cuda synchronize on a GPU). Memory: {how}. 'others busy': "
          f"share of all cores used by other processes during the timed steps.")


def finish(results, args, env, lines):
  """The summary, --json_out, --table_out and the table, last."""
  print("\n## summary\n" + "\n".join(lines))
  if args.table_out and lines:  # not for a run the cross-check stopped
    header = (f"{common.hardware_versions(env, DISTS)} {env['dtype']} compute (LoRA adapters "
              f"{env['adapter_dtype']}), batch {args.batch} x {args.seq_len}, median of "
              f"{args.steps} timed steps after {args.warmup} warm-up, remat {args.remat}, "
              f"decoder_jax attention {env['jax_attention']}, torch.compile "
              f"{'on' if args.torch_compile else 'off'}, AdamW lr {args.lr:g}, clip "
              f"{args.grad_clip:g}, LoRA r {args.lora_rank} alpha {args.lora_alpha} on "
              "q/k/v/o/gate/up/down.")
    common.append_section(args.table_out, "Fine-tuning step throughput, SmolLM2-135M "
                          "architecture", env, header,
                          table_lines(results, env) + ["", note(env), ""] + lines)
  hw = env["jax_device"] if env["gpu"] else f"{env['cpu']}, {env['cores']} cores"
  print(f"\n## results ({env['dtype']}, {hw}, batch {args.batch} x {args.seq_len}, median of "
        f"{args.steps} steps after {args.warmup} warm-up, remat {args.remat}, torch.compile "
        f"{'on' if args.torch_compile else 'off'})\n")
  print("\n".join(table_lines(results, env)) + "\n\n" + note(env))


def report(args):
  """The summary and table from --json_out files; later files' rows replace earlier ones."""
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
    env, run_args = env or e, run_args or argparse.Namespace(**a)
    by.update({r["side"]: r for r in data["results"]})
  run_args.table_out = args.table_out
  env = dict(env, command=f"{env['command']}  (+ {common.command_line('finetune.py', sys.argv[1:])})")
  finish(list(by.values()), run_args, env, summary_lines(by, env))


def write_json(args, env, results, checks):
  if args.json_out:
    with open(args.json_out, "w") as f:
      json.dump({"env": env, "args": vars(args), "results": results, "checks": checks}, f,
                indent=2, default=str)
    print(f"wrote {args.json_out}")


def main(argv=None):
  args = parse_args(argv)
  if args.report:
    return report(args)
  import jax
  gpu = jax.default_backend() == "gpu"
  need_hf = any(s.startswith("hf") for s in args.sides)
  env = common.env_facts(("jax", "jaxlib") + DISTS)
  if need_hf:
    import torch
    if gpu != torch.cuda.is_available():
      raise SystemExit(
          f"ABORT: JAX runs on {jax.default_backend()!r} but torch {torch.__version__} "
          f"{'has' if torch.cuda.is_available() else 'has no'} CUDA: the HF rows would run on "
          "another device than decoder_jax. Install a matching torch build (or jax), or pass "
          "--sides jax / --sides hf.")
    torch.set_num_threads(args.threads or common.cores())
    env["torch_threads"] = torch.get_num_threads()
    if gpu:
      env.update(torch_gpu=torch.cuda.get_device_name(0), torch_cuda=torch.version.cuda)
  if args.torch_compile is None:
    args.torch_compile = gpu
  dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if gpu else "float32")
  device = jax.devices()[0]
  env.update(jax_backend=jax.default_backend(), gpu=gpu,
             jax_device=getattr(device, "device_kind", str(device)),
             torch_device=("cuda" if gpu else "cpu") if need_hf else None, dtype=dtype,
             adapter_dtype=args.adapter_dtype, torch_compile=args.torch_compile,
             jax_attention=(("cudnn" if gpu and dtype == "bfloat16" else "xla")
                            if args.jax_attention == "auto" else args.jax_attention),
             remat=args.remat, command=common.command_line("finetune.py", sys.argv[1:]))
  print("# fine-tuning step benchmark: SmolLM2-135M architecture, random weights")
  for k, v in env.items():
    print(f"  {k}: {v}")
  print(f"  batch {args.batch} x seq_len {args.seq_len} = {args.batch * args.seq_len:,} tokens "
        f"per step; {args.warmup} warm-up + {args.steps} timed steps per side; AdamW lr "
        f"{args.lr:g}, wd {args.weight_decay:g}, clip {args.grad_clip:g}; LoRA r "
        f"{args.lora_rank}, alpha {args.lora_alpha}, dropout 0; sides {args.sides}", flush=True)

  shared = Shared(args, any(s.endswith("lora") for s in args.sides))
  print(f"  weights: {shared.n_base:,} base params (+{shared.n_adapters:,} LoRA), "
        f"{shared.base_config.num_layers} layers, init {shared.init_s:.1f} s", flush=True)
  hf_state = common.hf_state_dict(shared.base_config, shared.base) if need_hf else None
  results, printed = [], set()
  for side in (s for s in RUN_ORDER if s in args.sides):
    print(f"\n## {LABELS[side]}", flush=True)
    framework, kind = side.split("_")
    rec = (run_jax(kind, args, shared, env) if framework == "jax" else
           run_hf(kind, args, shared, env, hf_state))
    common.print_side(rec)
    results.append(rec)
    try:
      check_losses(results, env, args, printed)
    except SystemExit as e:
      print(str(e), flush=True)
      finish(results, args, env, [])
      write_json(args, env, results, {"aborted": str(e)})
      raise SystemExit(2) from None
  by = {r["side"]: r for r in results}
  if "jax_lora" in by and "hf_lora" in by and by["jax_lora"]["trainable"] != \
      by["hf_lora"]["trainable"]:
    print(f"  WARNING: trainable LoRA params differ: decoder_jax {by['jax_lora']['trainable']:,}"
          f" vs PEFT {by['hf_lora']['trainable']:,}")
  write_json(args, env, results, {"step0_loss_pairs": [
      dict(zip(("a", "b", "loss_a", "loss_b", "abs_diff"), p)) for p in loss_pairs(results)]})
  finish(results, args, env, summary_lines(by, env))
  return 0


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
                  help="LoRA adapters and their optimizer state, both sides")
  ap.add_argument("--sides", default=",".join(SIDES),
                  help=f"comma list of {', '.join(SIDES)} (also: all, jax, hf, full, lora)")
  ap.add_argument("--remat", default="none", choices=("none", "full"),
                  help="full: decoder_jax remat of every block, HF gradient checkpointing")
  ap.add_argument("--torch_compile", action=argparse.BooleanOptionalAction, default=None,
                  help="torch.compile the HF model (default: on with CUDA, off on CPU)")
  ap.add_argument("--torch_compile_mode", default=None, help="e.g. max-autotune")
  ap.add_argument("--jax_attention", default="auto", choices=("auto", "xla", "cudnn"),
                  help="auto: cudnn on a GPU in bfloat16, else xla; a cudnn failure falls "
                  "back to xla")
  ap.add_argument("--lora_rank", type=int, default=16)
  ap.add_argument("--lora_alpha", type=int, default=32)
  ap.add_argument("--lr", type=float, default=1e-4)
  ap.add_argument("--weight_decay", type=float, default=0.0)
  ap.add_argument("--grad_clip", type=float, default=1.0, help="global-norm clip (0: none)")
  ap.add_argument("--loss_tol", type=float, default=1e-3,
                  help="float32 first-step loss agreement required across sides")
  ap.add_argument("--num_layers", type=int, default=0, help="override the 30 layers (smoke)")
  ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--json_out", default=None)
  ap.add_argument("--report", nargs="+", default=None, metavar="JSON",
                  help="print the summary and table of earlier --json_out files; runs nothing")
  ap.add_argument("--table_out", default=None, help="append a markdown section (date, "
                  "hardware, versions, command, table), e.g. benchmarks/RESULTS.md")
  args = ap.parse_args(argv)
  groups = {"all": SIDES, "jax": SIDES[:2], "hf": SIDES[2:], "full": SIDES[::2],
            "lora": SIDES[1::2]}
  wanted = set()
  for s in (x.strip().replace("-", "_") for x in args.sides.split(",") if x.strip()):
    if s not in groups and s not in SIDES:
      ap.error(f"--sides: unknown {s!r}; use {', '.join(SIDES)} or {', '.join(groups)}")
    wanted.update(groups.get(s, (s,)))
  args.sides = [s for s in SIDES if s in wanted]
  if not args.sides or args.batch < 1 or args.seq_len < 2 or args.steps < 1 or args.warmup < 0:
    ap.error("need some --sides, --batch >= 1, --seq_len >= 2, --steps >= 1, --warmup >= 0")
  return args


if __name__ == "__main__":
  sys.exit(main())
