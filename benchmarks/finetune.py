"""Fine-tuning step throughput, side by side: decoder_jax vs. Hugging Face transformers + PEFT.

Full and LoRA steps on the SmolLM2-135M architecture (random weights), all four rows in one
process on the same weights and batches. See benchmarks/README.md.

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
# LoRA first on each framework (jax's peak_bytes_in_use cannot be reset), each HF row right
# after its decoder_jax row (a failed cross-check stops the run early).
RUN_ORDER = ("jax_lora", "hf_lora", "jax_full", "hf_full")
PEFT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEER_H200 = {"full": 302e3, "lora": 235e3}  # HF + PEFT, bf16, torch.compile (the issue)
TARGETS = {"full": 1.3, "lora": 1.5}  # decoder_jax / peer tokens per second


def model_config(args, lora: bool, dtype="float32", param_dtype="float32", attention_impl="xla"):
  from decoder_jax.model import preset
  from decoder_jax.model.config import LoraConfig
  return preset(PRESET, dtype=dtype, param_dtype=param_dtype, scan_layers=True, dropout=0.0,
                remat=args.remat, attention_impl=attention_impl,
                **({"num_layers": args.num_layers} if args.num_layers else {}),
                # default targets attn/.* and mlp/.*: all seven projections
                **({"lora": LoraConfig(rank=args.lora_rank, alpha=float(args.lora_alpha),
                                       dropout=0.0)} if lora else {}))


def init_weights(args, want_lora: bool):
  """What every side starts from, on the host: (float32 config, base weights {flat path:
  numpy}, LoRA adapter init {flat path: numpy}, token batches)."""
  import jax
  from decoder_jax import peft
  t0 = time.perf_counter()
  config = model_config(args, lora=False)
  base, adapters = common.init_params(config, args.seed), {}
  if want_lora:
    lora_config = model_config(args, lora=True)
    peft.check_targets(lora_config)
    with jax.default_device(jax.devices("cpu")[0]):
      full = peft.init_lora_params(lora_config, common.unflat(base), jax.random.key(args.seed + 1))
      adapters = {p: np.asarray(v) for p, v in common.flat(full).items() if peft.is_lora_param(p)}
  print(f"  weights: {sum(v.size for v in base.values()):,} base params "
        f"(+{sum(v.size for v in adapters.values()):,} LoRA), {config.num_layers} layers, init "
        f"{time.perf_counter() - t0:.1f} s", flush=True)
  return config, base, adapters, common.random_batches(
      config.vocab_size, args.batch, args.seq_len, min(args.warmup + args.steps, 4), args.seed + 2)


def run_jax(kind, args, base, adapters, batches, env):
  import jax
  from decoder_jax import peft
  from decoder_jax.model import Decoder
  dtype, lora = env["dtype"], kind == "lora"
  param_dtype = args.adapter_dtype if lora else dtype

  def prepare(impl, batch, rng):
    config = model_config(args, lora, dtype, param_dtype, impl)
    params = common.unflat({**base, **adapters} if lora else base)
    trainable, frozen = peft.split(params, peft.is_lora_param) if lora else (params, {})
    # Adapters train in adapter_dtype; the frozen base is held in the compute dtype, as
    # train.frozen_dtype does in the training loop.
    trainable = jax.device_put(jax.tree.map(lambda x: common.cast(x, param_dtype), trainable))
    frozen = jax.device_put(jax.tree.map(lambda x: common.cast(x, dtype), frozen))
    state, compiled, info = common.compile_train_step(
        Decoder(config), common.train_state(trainable, args), frozen, batch, rng)
    return state, frozen, compiled, dict(info, remat=config.remat)

  return common.jax_side({"side": f"jax_{kind}"}, prepare, env["jax_attention"], batches,
                         args.seed, args.warmup, args.steps)


def run_hf(kind, args, config, hf_state, base, adapters, batches, env):
  def peft_model(model):
    """PEFT LoRA with decoder_jax's adapter init in lora_A / lora_B, in --adapter_dtype."""
    import torch
    from decoder_jax.interop import hf as hf_interop
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(model, LoraConfig(
        r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=0.0, bias="none",
        target_modules=list(PEFT_TARGETS), task_type="CAUSAL_LM"), autocast_adapter_dtype=True)
    where, ours = hf_interop.unscanned_leaves(config, base), {}
    for link in hf_interop.tensor_links(config):  # HF module -> (lora_A [r, in], lora_B [out, r])
      path, layer = where[link.ours]
      ab = [adapters.get(path[:-1] + (n,)) for n in ("lora_a", "lora_b")]
      if link.ours[-1] == "kernel" and ab[0] is not None:
        ours[link.hf.removesuffix(".weight")] = [
            np.ascontiguousarray((x if layer is None else x[layer]).T) for x in ab]
    done = 0
    for name, p in model.named_parameters():
      for which, index in ((".lora_A.default.weight", 0), (".lora_B.default.weight", 1)):
        if name.endswith(which):
          value = ours[name.removesuffix(which).removeprefix("base_model.model.")][index]
          if tuple(p.shape) != value.shape:
            raise RuntimeError(f"{name}: PEFT shape {tuple(p.shape)} vs ours {value.shape}")
          p.data = torch.from_numpy(value).to(device=p.device,
                                              dtype=getattr(torch, args.adapter_dtype))
          done += 1
    if done != 2 * len(ours):
      raise RuntimeError(f"copied {done} PEFT adapter tensors, expected {2 * len(ours)}")
    return model

  build = lambda: common.HfTrainer(  # noqa: E731
      config, args, env["torch_device"], env["dtype"], hf_state,
      checkpointing=args.remat == "full", compile=args.torch_compile,
      wrap=peft_model if kind == "lora" else None)
  return common.hf_side({"side": f"hf_{kind}"}, build, batches, args.warmup, args.steps)


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
  tol = args.loss_tol if float32 else common.BF16_WARN
  bad = []
  for a, b, la, lb, d in loss_pairs(results):
    if (a, b) not in printed:
      printed.add((a, b))
      print(f"  cross-check step-0 loss: {LABELS[a]} {la:.6f} vs {LABELS[b]} {lb:.6f}: |diff| "
            f"{d:.2e} ({'ok' if d <= tol else 'MISMATCH'}, tol {tol:g}"
            f"{'' if float32 else ', bf16 warning only'})", flush=True)
      bad += [] if d <= tol else [(a, b, la, lb, d)]  # NaN counts as bad
  if bad and float32:
    a, b, la, lb, d = bad[0]
    raise SystemExit(
        f"\nABORT: first-step losses disagree in float32: {LABELS[a]} {la:.6f} vs {LABELS[b]} "
        f"{lb:.6f} (|diff| {d:.3e} > --loss_tol {args.loss_tol:g}): the same weights on the "
        "same batch, so the models or the losses differ.")
  if bad:
    print(f"  WARNING: bf16 first-step losses differ by more than {common.BF16_WARN}: "
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
  lines += [f"- peer reference ({kind}, H200, bf16, torch.compile, from the issue): "
            f"{PEER_H200[kind]:,.0f} tok/s; this run's {LABELS[f'hf_{kind}']}: "
            f"{by[f'hf_{kind}']['tok_per_s']:,.0f} tok/s" for kind in ("full", "lora")
            if f"hf_{kind}" in by]
  lines += [f"- {LABELS[side]}: {by[side]['state_dtype_note']} (that steady state)"
            for side in ("jax_full", "jax_lora") if by.get(side, {}).get("state_dtype_note")]
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


def finish(results, args, env, lines):
  """The summary, then the table, last."""
  print("\n## summary\n" + "\n".join(lines))
  rows = []
  for r in sorted(results, key=lambda r: SIDES.index(r["side"])):
    hf_compiled = r["side"].startswith("hf") and r.get("torch_compile")
    rows.append([LABELS[r["side"]] + (" (compiled)" if hf_compiled else ""),
                 f"{r['ms_per_step']:.1f}", f"{r['tok_per_s']:,.0f}",
                 f"{r['trainable']:,} ({100 * r['trainable'] / r['total_params']:.2f}%)",
                 ("<= " if r.get("peak_is_upper_bound") else "")
                 + common.fmt_bytes(r["peak_bytes"]),
                 f"{r['trace_s']:.1f} + {r['compile_s']:.1f}" if "compile_s" in r else
                 "(in first step)" if r.get("torch_compile") else "-", f"{r['first_step_s']:.2f}",
                 f"{r['loss_first']:.4f} -> {r['loss_last']:.4f}",
                 common.busy_cells([r.get("others_busy")])])
  hw = env["jax_device"] if env["gpu"] else f"{env['cpu']}, {env['cores']} cores"
  print(f"\n## results ({env['dtype']}, {hw}, batch {args.batch} x {args.seq_len}, median of "
        f"{args.steps} steps after {args.warmup} warm-up, remat {args.remat}, torch.compile "
        f"{'on' if args.torch_compile else 'off'})\n")
  print("\n".join(common.md_table(
      ["side", "ms/step (median)", "tokens/s", "trainable params",
       "peak device memory" if env["gpu"] else "peak RSS growth", "trace + compile s",
       "first step s", "loss step 0 -> last", "others busy"], rows, right=(1, 2, 3, 4, 5, 6, 8))))


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
  finish(list(by.values()), run_args, env, summary_lines(by, env))


def main(argv=None):
  args = parse_args(argv)
  if args.report:
    return report(args)
  import jax
  gpu = jax.default_backend() == "gpu"
  need_hf = any(s.startswith("hf") for s in args.sides)
  env = common.env_facts(("jax", "jaxlib", "flax", "optax", "torch", "transformers", "peft"))
  if need_hf:
    import torch
    if gpu != torch.cuda.is_available():
      raise SystemExit(
          f"ABORT: JAX runs on {jax.default_backend()!r} but torch {torch.__version__} "
          f"{'has' if torch.cuda.is_available() else 'has no'} CUDA: the HF rows would run on "
          "another device. Install a matching torch (or jax), or pass --sides jax / --sides hf.")
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
  print("\n".join(f"  {k}: {v}" for k, v in env.items()))
  print(f"  batch {args.batch} x seq_len {args.seq_len} = {args.batch * args.seq_len:,} tokens "
        f"per step; {args.warmup} warm-up + {args.steps} timed steps per side; AdamW lr "
        f"{args.lr:g}, wd {args.weight_decay:g}, clip {args.grad_clip:g}; LoRA r "
        f"{args.lora_rank}, alpha {args.lora_alpha}, dropout 0; sides {args.sides}", flush=True)

  config, base, adapters, batches = init_weights(args, any(s.endswith("lora") for s in args.sides))
  hf_state = common.hf_state_dict(config, base) if need_hf else None
  results, printed, checks = [], set(), {}
  for side in (s for s in RUN_ORDER if s in args.sides):
    print(f"\n## {LABELS[side]}", flush=True)
    framework, kind = side.split("_")
    rec = (run_jax(kind, args, base, adapters, batches, env) if framework == "jax" else
           run_hf(kind, args, config, hf_state, base, adapters, batches, env))
    common.print_side(rec)
    results.append(rec)
    try:
      check_losses(results, env, args, printed)
    except SystemExit as e:
      print(str(e), flush=True)
      checks["aborted"] = str(e)
      break
  by = {r["side"]: r for r in results}
  if "jax_lora" in by and "hf_lora" in by and by["jax_lora"]["trainable"] != \
      by["hf_lora"]["trainable"]:
    print(f"  WARNING: trainable LoRA params differ: decoder_jax {by['jax_lora']['trainable']:,}"
          f" vs PEFT {by['hf_lora']['trainable']:,}")
  checks = checks or {"step0_loss_pairs": [
      dict(zip(("a", "b", "loss_a", "loss_b", "abs_diff"), p)) for p in loss_pairs(results)]}
  lines = [] if "aborted" in checks else summary_lines(by, env)
  if args.json_out:
    common.dump(args.json_out, {"env": env, "args": vars(args), "results": results,
                                "checks": checks})
  finish(results, args, env, lines)
  return 2 if "aborted" in checks else 0


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  add = ap.add_argument
  add("--batch", type=int, default=32)
  add("--seq_len", type=int, default=512)
  add("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
      help="compute dtype, parameter dtype of the full rows and the frozen LoRA base "
      "(auto: bfloat16 on a GPU, float32 on CPU)")
  add("--adapter_dtype", default="float32", choices=("float32", "bfloat16"),
      help="LoRA adapters and their optimizer state, both sides")
  add("--sides", default=",".join(SIDES),
      help=f"comma list of {', '.join(SIDES)} (also: all, jax, hf, full, lora)")
  add("--remat", default="none", choices=("none", "full"),
      help="full: decoder_jax remat of every block, HF gradient checkpointing")
  add("--lora_rank", type=int, default=16)
  add("--lora_alpha", type=int, default=32)
  common.add_step_flags(ap, lr=1e-4, weight_decay=0.0)
  add("--report", nargs="+", default=None, metavar="JSON",
      help="print the summary and table of earlier --json_out files; runs nothing")
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
