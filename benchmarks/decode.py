"""Decode speed, side by side: decoder_jax vs. Hugging Face transformers `generate` (greedy,
SmolLM2-135M architecture, both sides in one process on the same weights); speculative
decoding and shared prefixes on decoder_jax. See benchmarks/README.md.

  python benchmarks/decode.py                               # batches 1,8,64, 3 repeats
  python benchmarks/decode.py --pretrained=fetch:smollm2-135m-instruct --new_tokens 64 \\
      --speculative self:8,self:16 --num_draft 2,4     # real weights and prompts
  python benchmarks/decode.py --report /tmp/decode1.json /tmp/decode64.json   # one table
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import statistics
import sys
import time

import numpy as np

import common

PRESET = "smollm2-135m"
# Final user turns of the --pretrained prompts, row r asking QUESTIONS[r % 16].
QUESTIONS = [
    "What is the capital of France, and what is it famous for?",
    "Explain in two sentences why the sky is blue.",
    "Give me three tips for staying focused while studying at home.",
    "Write a short Python function that reverses a string.",
    "What is the difference between weather and climate?",
    "How do vaccines help the immune system fight disease?",
    "Summarise the plot of Romeo and Juliet in a few sentences.",
    "What are the main causes of inflation?",
    "Suggest a healthy breakfast that takes five minutes to make.",
    "Why do cats purr?", "How does a rainbow form?",
    "What is photosynthesis and why does it matter?",
    "Translate 'good morning, how are you?' into Spanish.",
    "List four planets of the solar system and one fact about each.",
    "What should I pack for a weekend hiking trip?", "How can I improve my sleep?",
]
# Earlier turns put before a prompt (most recent last) while it is shorter than --prompt_len.
EARLIER_TURNS = [
    ("Hi there!", "Hello! How can I help you today?"),
    ("Can you answer a few questions for me?", "Of course. Ask away and I will do my best."),
    ("Please keep your answers short.", "Sure, I will keep them brief and to the point."),
]


def chat_prompts(tokenizer, rows: int, prompt_len: int) -> np.ndarray:
  """int32 [rows, prompt_len]: QUESTIONS[r % 16] as the last user turn through the chat
  template, cut to its last prompt_len tokens or with earlier turns put before it."""
  from decoder_jax.inference import encode_chat
  out = np.zeros((rows, prompt_len), np.int32)
  for r in range(rows):
    question = [{"role": "user", "content": QUESTIONS[r % len(QUESTIONS)]}]
    earlier, turns = [], itertools.cycle(reversed(EARLIER_TURNS))
    ids = encode_chat(tokenizer, question)
    while len(ids) < prompt_len:
      user, assistant = next(turns)
      earlier = [{"role": "user", "content": user},
                 {"role": "assistant", "content": assistant}] + earlier
      ids = encode_chat(tokenizer, earlier + question)
    out[r] = ids[-prompt_len:]
  return out


class Program:
  """fn(*params, prompts, lengths, rng, greedy, no eos, **kw) on unpadded prompts, jitted and
  compiled ahead of time (trace_s, compile_s); run() times one call: (seconds, output)."""

  def __init__(self, fn, params, prompts, **kw):
    import jax
    import jax.numpy as jnp
    from decoder_jax import decoding
    prompts = jnp.asarray(prompts, jnp.int32)
    self.inputs = (*params, prompts, jnp.full((prompts.shape[0],), prompts.shape[1], jnp.int32),
                   jax.random.key(0))
    t0 = time.perf_counter()
    lowered = fn.lower(*self.inputs, sampler=decoding.Greedy(), eos_id=None, **kw)
    t1 = time.perf_counter()
    self.compiled = lowered.compile()
    self.trace_s, self.compile_s = t1 - t0, time.perf_counter() - t1

  def run(self):
    import jax
    jax.block_until_ready(self.inputs)
    t0 = time.perf_counter()
    out = jax.block_until_ready(self.compiled(*self.inputs))
    return time.perf_counter() - t0, out


def generate_program(params, config, prompts, new_tokens, **kw):
  from decoder_jax import inference
  return Program(inference.generate_tokens, (params,), prompts, model_config=config,
                 max_new_tokens=new_tokens, **kw)


class JaxSide:
  name = "decoder_jax"

  def __init__(self, args, config, params):
    self.args, self.config, self.params, self.programs = args, config, params, {}

  def run(self, prompts, new_tokens=None):
    """(seconds, new tokens int32 [batch, n]); the first call per batch and n compiles
    generate_tokens (n = 1: the prefill and one token, at the same cache length)."""
    key = len(prompts), new_tokens or self.args.new_tokens
    if key not in self.programs:
      self.programs[key] = generate_program(
          self.params, self.config, prompts, key[1], cache_block=self.args.cache_block or None,
          cache_length=prompts.shape[1] + self.args.new_tokens)
    seconds, out = self.programs[key].run()
    return seconds, np.asarray(out.tokens)

  def compile_info(self, batch):
    p = self.programs[batch, self.args.new_tokens]
    return {"trace_s": p.trace_s, "compile_s": p.compile_s}

  def logits(self, sequence):  # teacher-forced float32 [1, T, vocab], no cache
    import jax
    from decoder_jax.model import Decoder
    fn = jax.jit(lambda p, t: Decoder(self.config).apply({"params": p}, t)[0])
    return np.asarray(fn(self.params, np.asarray(sequence, np.int32)), np.float32)


class HfSide:

  def __init__(self, args, model, cache_implementation):
    self.args, self.model, self.cache = args, model, cache_implementation
    self.name = "hf-static" if cache_implementation == "static" else "hf-dynamic"

  def run(self, prompts, new_tokens=None):
    import torch
    n = new_tokens or self.args.new_tokens
    ids = torch.as_tensor(np.asarray(prompts), dtype=torch.long, device=self.model.device)
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    with torch.inference_mode():
      out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                pad_token_id=0, **({"cache_implementation": self.cache}
                                                   if self.cache else {}))
    sync()
    return time.perf_counter() - t0, out[:, ids.shape[1]:].cpu().numpy()

  def compile_info(self, batch):
    return {}

  def logits(self, sequence):
    import torch
    with torch.inference_mode():
      ids = torch.as_tensor(np.asarray(sequence), dtype=torch.long, device=self.model.device)
      return self.model(input_ids=ids).logits.float().cpu().numpy()


def cross_check(jax_side, hf_side, prompt, jax_tokens, hf_tokens):
  """Greedy tokens of both sides for one row; where they differ, by how much the logits do."""
  same = jax_tokens == hf_tokens
  first_diff = None if same.all() else int(np.argmin(same))
  # decoder_jax's continuation teacher-forced through both models: [1, P + N - 1]
  sequence = np.concatenate([prompt, jax_tokens[:-1]])[None]
  p = len(prompt)  # the logits that predict the generated tokens: [N, vocab]
  lj, lh = jax_side.logits(sequence)[0, p - 1:], hf_side.logits(sequence)[0, p - 1:]
  diff = np.abs(lj - lh)
  top2 = np.sort(lj, axis=-1)[:, -2:]  # decoder_jax's top-2 logits per step
  report = {"tokens_match": bool(same.all()), "matching_tokens": int(same.sum()),
            "first_mismatch_step": first_diff, "max_abs_logit_diff": float(diff.max()),
            "mean_abs_logit_diff": float(diff.mean()), "logit_std": float(lj.std()),
            "teacher_forced_argmax_agree": int((lj.argmax(-1) == lh.argmax(-1)).sum()),
            "steps": len(jax_tokens), "min_top1_margin": float((top2[:, 1] - top2[:, 0]).min())}
  if first_diff is not None:
    i, a, b = first_diff, int(jax_tokens[first_diff]), int(hf_tokens[first_diff])
    report["at_first_mismatch"] = {
        "jax_token": a, "hf_token": b, "jax_logits[jax_tok, hf_tok]": [float(lj[i, a]),
                                                                        float(lj[i, b])],
        "hf_logits[jax_tok, hf_tok]": [float(lh[i, a]), float(lh[i, b])],
        "max_abs_logit_diff_here": float(diff[i].max())}
  return report


def interleave(runs, repeats, label=None):
  """{name: {"runs": seconds, "outs", "others_busy"}} of `repeats` rounds of every
  runs[name]() -> (seconds, output), one after the other (both see the same load)."""
  got = {name: {"runs": [], "outs": [], "others_busy": []} for name in runs}
  for rep in range(repeats):
    for name, fn in runs.items():
      with common.contention() as c:
        seconds, out = fn()
      for key, value in zip(("runs", "outs", "others_busy"), (seconds, out, c["others"])):
        got[name][key].append(value)
      if label:
        print(f"  {label(name)} repeat {rep}: {seconds:.3f} s (others busy "
              f"{common.busy_cells([c['others']])})", flush=True)
  return got


def measure_speculative(jside, target, drafts, prompts, args):
  """Per draft and num_draft: greedy inference.speculative_tokens against plain decoder_jax
  on the same prompts, after one warm-up run each, the runs interleaved."""
  from decoder_jax import inference
  batch, new_tokens = len(prompts), args.new_tokens
  _, plain_tokens = jside.run(prompts)  # warm-up, and the reference tokens
  recs, programs = {}, {"decoder_jax (plain)": lambda: jside.run(prompts)}
  for (label, draft), k in itertools.product(drafts, args.num_draft):
    p = Program(inference.speculative_tokens, (target.params, draft.params), prompts,
                model_config=target.config, draft_config=draft.config,
                max_new_tokens=new_tokens, num_draft=k)
    first, out = p.run()
    n, lengths = plain_tokens.shape[1], np.asarray(out.lengths)
    same = (np.asarray(out.tokens)[:, :n] == plain_tokens).all(axis=1) & (lengths == n)
    accepted, proposed, passes = int(out.accepted), int(out.proposed), int(out.iterations)
    side = f"speculative {label} k={k}"
    recs[side] = rec = {
        "side": side, "batch": batch, "draft": label, "num_draft": k,
        "draft_layers": draft.config.num_layers, "first_call_s": first, "trace_s": p.trace_s,
        "compile_s": p.compile_s, "accepted": accepted, "proposed": proposed,
        "iterations": passes, "acceptance": accepted / max(proposed, 1),
        # tokens a row gains per target pass after the prefill (whose one token is left out)
        "tokens_per_pass": (int(lengths.sum()) - batch) / (batch * max(passes, 1)),
        "rows_identical": f"{int(same.sum())}/{len(same)}", "tokens_match": bool(same.all())}
    programs[side] = p.run
    print(f"  {side}: trace {p.trace_s:.2f} s + compile {p.compile_s:.2f} s, warm-up "
          f"{first:.2f} s; accepted {accepted}/{proposed} ({rec['acceptance']:.0%}), "
          f"{rec['tokens_per_pass']:.2f} tokens/target pass, tokens = plain greedy: "
          f"{rec['rows_identical']}", flush=True)
  got = interleave(programs, args.repeats, label=str)
  plain_runs = got.pop("decoder_jax (plain)")["runs"]
  plain = statistics.median(plain_runs)
  for side, g in got.items():
    rec, med = recs[side], statistics.median(g["runs"])
    if any(int(out.accepted) != rec["accepted"] for out in g["outs"]):
      print(f"  WARNING: {side} accepted another number of draft tokens on a repeat")
    rec.update(runs=g["runs"], others_busy=g["others_busy"], plain_runs=plain_runs,
               plain_ms_per_token=plain / new_tokens * 1e3, total_s_median=med,
               ms_per_token=med / new_tokens * 1e3, tok_per_s=batch * new_tokens / med,
               speedup=plain / med, speedup_best=min(plain_runs) / min(g["runs"]))
  return list(recs.values())


def measure_shared(params, config, prompt, args):
  """For N in --samples and 1 or --new_tokens steps: one prompt with num_samples=N (one
  prefill, its cache rows copied) against the prompt repeated as N rows, interleaved."""
  records = []
  for n, steps in itertools.product(args.samples, dict.fromkeys((1, args.new_tokens))):
    ways = {"shared": (prompt[None], n), "repeated": (np.repeat(prompt[None], n, axis=0), 1)}
    progs = {w: generate_program(params, config, rows, steps, num_samples=per_prompt)
             for w, (rows, per_prompt) in ways.items()}
    tokens = {w: np.asarray(p.run()[1].tokens) for w, p in progs.items()}  # warm-up
    got = interleave({w: p.run for w, p in progs.items()}, args.repeats)
    shared, repeated = (statistics.median(got[w]["runs"]) for w in ("shared", "repeated"))
    rec = {"samples": n, "new_tokens": steps, "shared_s": shared, "repeated_s": repeated,
           "ratio": repeated / shared, "shared_runs": got["shared"]["runs"],
           "repeated_runs": got["repeated"]["runs"], "others_busy": [
               o for pair in zip(*(got[w]["others_busy"] for w in ways)) for o in pair],
           "tokens_identical": bool(np.array_equal(tokens["shared"], tokens["repeated"]))}
    records.append(rec)
    print(f"  N={n}, {steps} new tokens: shared {shared * 1e3:.1f} ms, repeated "
          f"{repeated * 1e3:.1f} ms ({rec['ratio']:.2f}x); tokens identical "
          f"{rec['tokens_identical']}", flush=True)
  return records


def print_tables(results, speculative, shared, args, env):
  """The decode table, the speculative and shared-prefix tables, then every row's summary."""
  f = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
  runs = lambda xs: ", ".join(f"{x:.2f}" for x in xs)  # noqa: E731
  table = lambda *a: print("\n".join(common.md_table(*a)))  # noqa: E731
  print(f"\n## results ({env['dtype']}, {env['jax_backend']} / torch {env['torch_device']}, "
        f"{env['cores']} cores, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
        f"median of {args.repeats})\n")
  table(["side", "batch", "ms/step (total/N)", "new tok/s", "ms/step best run", "prefill ms",
         "decode-only ms/step", "first call s", "trace + compile s", "runs s", "others busy"],
        [[r["side"], r["batch"], f"{r['ms_per_step']:.2f}", f"{r['tok_per_s']:,.1f}",
          f"{r['ms_per_step_min']:.2f}",
          f(r.get("prefill_s_median") and r["prefill_s_median"] * 1e3, ".1f"),
          f(r.get("decode_only_ms_per_step"), ".2f"), f"{r['first_call_s']:.2f}",
          f"{r['trace_s']:.2f} + {r['compile_s']:.2f}" if "compile_s" in r else "-",
          runs(r["runs"]), common.busy_cells(r["others_busy"])] for r in results])
  by = {(r["side"], r["batch"]): r for r in results}
  lines = [f"- batch {r['batch']}: decoder_jax / {o['side']} ms per step = "
           f"{r['ms_per_step'] / o['ms_per_step']:.2f}x (medians), "
           f"{r['ms_per_step_min'] / o['ms_per_step_min']:.2f}x (best runs)"
           for r in results if r["side"] == "decoder_jax"
           for o in (by.get((s, r["batch"])) for s in ("hf-static", "hf-dynamic")) if o]
  if lines:
    print("\n" + "\n".join(lines))
  if speculative:
    print(f"\n## speculative decoding (greedy, median of {args.repeats}, plain decoder_jax runs "
          "interleaved with them)\n")
    table(["side", "batch", "draft layers", "ms/token", "tok/s", "plain decoder_jax ms/token",
           "speed-up (median)", "speed-up (best runs)", "acceptance", "tokens / target pass",
           "target passes", "tokens = plain greedy", "trace + compile s", "runs s"],
          [[r["side"], r["batch"], r["draft_layers"], f"{r['ms_per_token']:.2f}",
            f"{r['tok_per_s']:,.1f}", f"{r['plain_ms_per_token']:.2f}", f"{r['speedup']:.2f}x",
            f"{r['speedup_best']:.2f}x",
            f"{r['acceptance']:.1%} ({r['accepted']}/{r['proposed']})",
            f"{r['tokens_per_pass']:.2f}", r["iterations"], r["rows_identical"],
            f"{r['trace_s']:.2f} + {r['compile_s']:.2f}", runs(r["runs"])] for r in speculative])
  if shared:
    print(f"\n## shared prefixes: one prompt of {args.prompt_len} tokens, N rows (greedy, "
          f"median of {args.repeats})\n")
    table(["N", "new tokens", "shared: 1 prefill, num_samples=N (ms)",
           "repeated: N rows, N prefills (ms)", "repeated / shared", "tokens identical",
           "others busy"],
          [[r["samples"], r["new_tokens"], f"{r['shared_s'] * 1e3:,.1f}",
            f"{r['repeated_s'] * 1e3:,.1f}", f"{r['ratio']:.2f}x", r["tokens_identical"],
            common.busy_cells(r["others_busy"])] for r in shared])
  if speculative or len(results) > 1:
    plain = {r["batch"]: r["ms_per_step"] for r in results if r["side"] == "decoder_jax"}
    rows = [(r["side"], r["batch"], r["ms_per_step"], r["tok_per_s"],
             r["ms_per_step"] / plain[r["batch"]] if r["batch"] in plain else None)
            for r in results]  # speculative rows: against the plain runs beside them
    rows += [(r["side"], r["batch"], r["ms_per_token"], r["tok_per_s"], 1 / r["speedup"])
             for r in speculative]
    print(f"\n## summary: ms/token and tokens/s ({args.new_tokens} new tokens, prefill "
          "included)\n")
    table(["side", "batch", "ms/token", "tokens/s", "vs decoder_jax (time ratio)"],
          [[s, b, f"{ms:.2f}", f"{tps:,.1f}", f(ratio, ".2f") + ("x" if ratio else "")]
           for s, b, ms, tps, ratio in sorted(rows, key=lambda x: x[1])])


def report(paths):
  """One set of tables from several --json_out files (e.g. batch 1 and 64 run apart)."""
  results, checks, speculative, shared = [], {}, [], []
  for path in paths:
    with open(path) as f:
      data = json.load(f)
    env, a = data["env"], data["args"]
    results += data["results"]
    speculative += data.get("speculative", [])
    shared += data.get("shared_prefix", [])
    checks.update(data.get("checks", {}))
    print(f"{path}: batches {a['batches']}, repeats {a['repeats']}, {env['dtype']}, jax "
          f"{env['jax']}, torch {env['torch']}, transformers {env['transformers']}, "
          f"{env['cores']} cores")
  args = argparse.Namespace(**a)
  args.repeats = "/".join(sorted({str(len(r["runs"])) for r in results}))
  print_tables(results, speculative, shared, args, env)
  if checks:
    print("\nchecks: " + json.dumps(checks, indent=2))


def main(argv=None):
  args = parse_args(argv)
  if args.report:
    return report(args.report)
  import jax
  import torch
  from decoder_jax import inference, load_pretrained
  from decoder_jax.model import preset
  backend = jax.default_backend()
  dtype = args.dtype if args.dtype != "auto" else ("float32" if backend == "cpu" else "bfloat16")
  torch_device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.set_num_threads(args.threads or common.cores())
  env = {**common.env_facts(("jax", "jaxlib", "flax", "torch", "transformers")),
         "jax_devices": [str(d) for d in jax.devices()], "jax_backend": backend,
         "torch_device": torch_device, "torch_threads": torch.get_num_threads(), "dtype": dtype,
         "matmul_dtype": args.matmul_dtype,
         # PASSIVE: torch's OpenMP threads sleep instead of spinning when a core is taken.
         "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
         "weights": args.pretrained or "random"}
  print("# decode benchmark: SmolLM2-135M architecture, "
        + (f"weights of {args.pretrained}" if args.pretrained else "random weights"))
  print("\n".join(f"  {k}: {v}" for k, v in env.items()))
  print(f"  prompt_len {args.prompt_len}, new_tokens {args.new_tokens}, greedy, no eos, "
        f"batches {args.batches}, repeats {args.repeats} (+1 warm-up)", flush=True)
  t0 = time.perf_counter()
  if args.pretrained:
    target = load_pretrained(args.pretrained, dtype=dtype)
    target.config = dataclasses.replace(target.config, matmul_dtype=args.matmul_dtype)
  else:
    config = preset(PRESET, dtype=dtype, param_dtype=dtype, matmul_dtype=args.matmul_dtype)
    params = jax.device_put(common.unflat(common.init_params(config, args.seed)))
    target = inference.TrainedModel(config, params, None)
  config, params = target.config, jax.block_until_ready(target.params)
  print(f"  decoder_jax params: {sum(x.size for x in jax.tree.leaves(params)):,} "
        f"({time.perf_counter() - t0:.1f} s to {'load' if args.pretrained else 'init'})")
  sides = [] if args.skip_jax else [JaxSide(args, config, params)]
  if not args.skip_hf:
    t0 = time.perf_counter()
    model = common.hf_model(config, torch_device).to(dtype=getattr(torch, dtype)).eval()
    common.load_into_hf(model, common.hf_state_dict(config, common.flat(params)))
    # No end-of-sequence token: HF neither stops at it nor (min_new_tokens) masks it.
    model.generation_config.eos_token_id = None
    env["hf_attn_implementation"] = model.config._attn_implementation  # pylint: disable=protected-access
    print(f"  HF model: {sum(p.numel() for p in model.parameters()):,} params, attention "
          f"{env['hf_attn_implementation']}, weights copied from decoder_jax "
          f"({time.perf_counter() - t0:.1f} s)", flush=True)
    sides += [HfSide(args, model, c) for c in ("static", None)[:1 + args.hf_dynamic]]
  rows = max(args.batches + (args.speculative_batches if args.speculative else []))
  if args.pretrained:
    all_prompts = chat_prompts(target.tokenizer, rows, args.prompt_len)
    print(f"  prompt of row 0: {target.tokenizer.decode(all_prompts[0].tolist())!r}")
  else:  # row-major: row 0 is the same for any `rows`
    all_prompts = np.random.RandomState(args.seed).randint(
        0, config.vocab_size, size=(rows, args.prompt_len), dtype=np.int64).astype(np.int32)
  results, tokens, checks = [], {}, {}
  for batch in args.batches:
    prompts, n = all_prompts[:batch], args.new_tokens
    print(f"\n## batch {batch}", flush=True)
    rec = {}
    for s in sides:  # compile + warm-up
      first, tokens[s.name, batch] = s.run(prompts)
      rec[s.name] = r = {"side": s.name, "batch": batch, **s.compile_info(batch),
                         "first_call_s": first}
      print(f"  {s.name}: warm-up run {r['first_call_s']:.2f} s" + "".join(
          f", {k} {r[k]:.2f} s" for k in ("trace_s", "compile_s") if k in r), flush=True)
    got = interleave({s.name: lambda s=s: s.run(prompts) for s in sides}, args.repeats, str)
    for s in sides:
      rec[s.name].update(runs=got[s.name]["runs"], others_busy=got[s.name]["others_busy"])
      if any(not np.array_equal(t, tokens[s.name, batch]) for t in got[s.name]["outs"]):
        print(f"  WARNING: {s.name} produced different tokens on a repeat")
      if not args.no_prefill:
        s.run(prompts, 1)  # compile / warm
        rec[s.name]["prefill_runs"] = [s.run(prompts, 1)[0] for _ in range(args.repeats)]
        print(f"  {s.name} prefill: median "
              f"{statistics.median(rec[s.name]['prefill_runs']) * 1e3:.1f} ms", flush=True)
    if args.profile_dir and not args.skip_jax:
      path = os.path.join(args.profile_dir, f"batch{batch}")
      with jax.profiler.trace(path):
        seconds, _ = sides[0].run(prompts)
      print(f"  profile of one decoder_jax run ({seconds:.3f} s) in {path}", flush=True)
    for r in rec.values():
      med = r["total_s_median"] = statistics.median(r["runs"])
      r.update(ms_per_step=med / n * 1e3, tok_per_s=batch * n / med,
               ms_per_step_min=min(r["runs"]) / n * 1e3)
      if "prefill_runs" in r:
        r["prefill_s_median"] = statistics.median(r["prefill_runs"])
        r["decode_only_ms_per_step"] = (med - r["prefill_s_median"]) / (n - 1) * 1e3
      results.append(r)
    if not args.skip_jax and not args.skip_hf:  # same weights and prompts
      jt, ht = tokens["decoder_jax", batch], tokens["hf-static", batch]
      same = int((jt == ht).all(axis=1).sum())
      checks[f"batch{batch}_rows_identical_jax_vs_hf_static"] = f"{same}/{batch}"
      print(f"  greedy tokens identical (decoder_jax vs hf-static): {same}/{batch} rows, "
            f"{float((jt == ht).mean()):.1%} of tokens", flush=True)
  if not args.no_cross_check and not args.skip_jax and not args.skip_hf:
    if dtype != "float32":
      print("\n(cross-check skipped: it is meaningful in float32 only; pass --dtype float32)")
    else:
      if 1 not in args.batches:  # no batch-1 timing: decode one row now
        for s in sides[:2]:
          tokens[s.name, 1] = s.run(all_prompts[:1])[1]
      checks["batch1_float32"] = cross_check(sides[0], sides[1], all_prompts[0],
                                             tokens["decoder_jax", 1][0], tokens["hf-static", 1][0])
      print("\n## cross-check, batch 1, float32, same weights\n"
            + json.dumps(checks["batch1_float32"], indent=2))
  speculative = []
  if args.speculative:
    if not args.pretrained:
      print("\nWARNING: speculative decoding on random weights: acceptance is at chance; "
            "pass --pretrained for a meaningful figure")
    drafts = []  # self:N, the target's first N layers (arrays shared); draft:SOURCE
    for kind, arg in args.speculative:
      draft = (inference.self_draft(target, int(arg)) if kind == "self" else
               load_pretrained(arg, dtype=dtype))
      inference.check_draft(target, draft, args.prompt_len, args.new_tokens, max(args.num_draft))
      drafts.append((f"{kind}:{arg}", draft))
    for batch in args.speculative_batches:
      print(f"\n## speculative decoding, batch {batch}: drafts {[d for d, _ in drafts]}, "
            f"num_draft {args.num_draft}", flush=True)
      speculative += measure_speculative(sides[0], target, drafts, all_prompts[:batch], args)
  shared = []
  if args.samples and not args.skip_jax:
    print(f"\n## shared prefixes: N in {args.samples}", flush=True)
    shared = measure_shared(params, config, all_prompts[0], args)
  print_tables(results, speculative, shared, args, env)
  if args.json_out:
    common.dump(args.json_out, {"env": env, "args": vars(args), "results": results,
                                "checks": checks, "speculative": speculative,
                                "shared_prefix": shared})


def parse_args(argv=None):
  ints = lambda text: [int(x) for x in text.split(",") if x.strip()]  # noqa: E731

  def drafts(text):  # 'self:10,draft:gguf:/m.gguf' -> [("self", "10"), ("draft", "gguf:/m.gguf")]
    specs = [item.partition(":")[::2] for item in filter(None, map(str.strip, text.split(",")))]
    for kind, arg in specs:
      if not (kind == "self" and arg.isdigit() or kind == "draft" and arg):
        raise argparse.ArgumentTypeError(f"{kind}:{arg}: give self:LAYERS or draft:SOURCE")
    return specs
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  add = ap.add_argument
  add("--batches", default="1,8,64", type=ints, help="comma-separated batch sizes")
  add("--new_tokens", type=int, default=256)
  add("--prompt_len", type=int, default=32)
  add("--repeats", type=int, default=3, help="timed runs per side and batch after a warm-up")
  add("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
      help="both sides' compute, parameter and cache dtype (auto: float32 on CPU, else bf16)")
  add("--matmul_dtype", default=None, choices=(None, "bfloat16"),
      help="decoder_jax's model.matmul_dtype (bf16 operands, float32 sums)")
  add("--cache_block", type=int, default=None,
      help="generate_tokens(cache_block=N): a cache grown N slots at a time")
  add("--hf_dynamic", action="store_true", help="also time HF's default dynamic cache")
  add("--skip_jax", action="store_true")
  add("--skip_hf", action="store_true")
  add("--no_prefill", action="store_true", help="do not time prefill apart")
  add("--no_cross_check", action="store_true")
  add("--threads", type=int, default=0, help="torch threads (0: all cores)")
  add("--seed", type=int, default=0, help="seed of the weights and prompts")
  add("--profile_dir", default=None, help="a jax.profiler trace of one decoder_jax run per batch")
  add("--pretrained", default=None, metavar="SOURCE",
      help="real weights and chat prompts (a load_pretrained source)")
  add("--speculative", default=[], type=drafts,
      help="comma-separated drafts: self:N (the target's first N layers) or draft:SOURCE")
  add("--num_draft", default="4", type=ints, help="comma-separated draft lengths k")
  add("--speculative_batches", default="1", type=ints, help="batches of the speculative rows")
  add("--samples", default="16", type=ints,
      help="comma-separated N of the shared-prefix rows (N=1 is added; empty: skip them)")
  add("--json_out", default=None)
  add("--report", nargs="+", default=None, metavar="JSON",
      help="print the tables of earlier --json_out files (runs nothing)")
  args = ap.parse_args(argv)
  args.samples = sorted({1, *args.samples}) if args.samples else []
  if args.speculative and (args.skip_jax or not args.num_draft or min(args.num_draft) < 1):
    ap.error("--speculative needs the decoder_jax side and --num_draft >= 1")
  if args.new_tokens < 2 or args.prompt_len < 1 or args.repeats < 1 or not args.batches:
    ap.error("need --new_tokens >= 2, --prompt_len >= 1, --repeats >= 1, some --batches")
  return args

if __name__ == "__main__":
  sys.exit(main())
