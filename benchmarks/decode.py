"""Decode speed, side by side: decoder_jax vs. Hugging Face transformers `generate`.

Greedy decoding, no end-of-sequence stop, SmolLM2-135M architecture (random weights or
--pretrained ones), both sides in one process on the same arrays: decoder_jax's
inference.generate_tokens (compiled ahead of time) against HF generate with a static (and,
with --hf_dynamic, a dynamic) cache; speculative decoding and shared prefixes on
decoder_jax. The tables: benchmarks/README.md.

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
    "Why do cats purr?",
    "How does a rainbow form?",
    "What is photosynthesis and why does it matter?",
    "Translate 'good morning, how are you?' into Spanish.",
    "List four planets of the solar system and one fact about each.",
    "What should I pack for a weekend hiking trip?",
    "How can I improve my sleep?",
]
# Earlier turns put before a prompt (most recent last) while it is shorter than --prompt_len.
EARLIER_TURNS = [
    ("Hi there!", "Hello! How can I help you today?"),
    ("Can you answer a few questions for me?", "Of course. Ask away and I will do my best."),
    ("Please keep your answers short.", "Sure, I will keep them brief and to the point."),
]


def chat_prompts(tokenizer, rows: int, prompt_len: int) -> np.ndarray:
  """int32 [rows, prompt_len]: QUESTIONS[r % 16] as the last user turn through the chat
  template (its default system message and the assistant cue included). Every row is
  exactly prompt_len tokens, unpadded: a longer one keeps its last prompt_len tokens, a
  shorter one gets earlier small-talk turns before it."""
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


# ----------------------------------------------------------------------------- decoder_jax


class Program:
  """A jitted function compiled ahead of time for fixed inputs; run() times one call."""

  def __init__(self, fn, *inputs, **static):
    t0 = time.perf_counter()
    lowered = fn.lower(*inputs, **static)
    t1 = time.perf_counter()
    self.compiled, self.inputs = lowered.compile(), inputs
    self.trace_s, self.compile_s = t1 - t0, time.perf_counter() - t1

  def run(self):
    import jax
    jax.block_until_ready(self.inputs)
    t0 = time.perf_counter()
    out = jax.block_until_ready(self.compiled(*self.inputs))
    return time.perf_counter() - t0, out


def greedy_inputs(prompts):
  """(prompts int32 [batch, length], lengths int32 [batch], rng) of unpadded prompts."""
  import jax
  import jax.numpy as jnp
  prompts = jnp.asarray(prompts, jnp.int32)
  return prompts, jnp.full((prompts.shape[0],), prompts.shape[1], jnp.int32), jax.random.key(0)


def generate_program(params, config, prompts, new_tokens, **kw):
  from decoder_jax import decoding, inference
  return Program(inference.generate_tokens, params, *greedy_inputs(prompts), model_config=config,
                 max_new_tokens=new_tokens, sampler=decoding.Greedy(), eos_id=None, **kw)


class JaxSide:
  name = "decoder_jax"

  def __init__(self, args, config, params):
    self.args, self.config, self.params, self.programs = args, config, params, {}

  def prepare(self, prompts, new_tokens=None):
    """Compiles generate_tokens for this batch; new_tokens=1 is the prefill alone (the
    prompt's forward, logits at its last token, one token chosen) at the same cache length."""
    n = new_tokens or self.args.new_tokens
    p = self.programs[len(prompts), n] = generate_program(
        self.params, self.config, prompts, n, cache_block=self.args.cache_block or None,
        cache_length=prompts.shape[1] + self.args.new_tokens)
    return {"trace_s": p.trace_s, "compile_s": p.compile_s}

  def run(self, prompts, new_tokens=None):  # (seconds, new tokens int32 [batch, new_tokens])
    if (len(prompts), new_tokens or self.args.new_tokens) not in self.programs:
      self.prepare(prompts, new_tokens)
    seconds, out = self.programs[len(prompts), new_tokens or self.args.new_tokens].run()
    return seconds, np.asarray(out.tokens)

  def logits(self, sequence):  # teacher-forced float32 [1, T, vocab], no cache
    import jax
    from decoder_jax.model import Decoder
    fn = jax.jit(lambda p, t: Decoder(self.config).apply({"params": p}, t)[0])
    return np.asarray(fn(self.params, np.asarray(sequence, np.int32)), np.float32)


class HfSide:

  def __init__(self, args, model, cache_implementation):
    self.args, self.model, self.cache_implementation = args, model, cache_implementation
    self.name = "hf-static" if cache_implementation == "static" else "hf-dynamic"

  def prepare(self, prompts):
    return {}

  def run(self, prompts, new_tokens=None):
    import torch
    n = new_tokens or self.args.new_tokens
    ids = torch.as_tensor(np.asarray(prompts), dtype=torch.long, device=self.model.device)
    extra = {"cache_implementation": self.cache_implementation} if self.cache_implementation \
        else {}
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    with torch.inference_mode():
      out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                pad_token_id=0, **extra)
    sync()
    return time.perf_counter() - t0, out[:, ids.shape[1]:].cpu().numpy()

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


# ----------------------------------------------------------------------------- speculative


def make_drafts(specs, target, dtype: str, args):
  """[(label, TrainedModel)]: self:N = inference.self_draft (the target's first N layers,
  its arrays shared), draft:SOURCE = load_pretrained in the run's dtype."""
  from decoder_jax import inference, load_pretrained
  drafts = []
  for kind, arg in specs:
    draft = (inference.self_draft(target, int(arg)) if kind == "self" else
             load_pretrained(arg, dtype=dtype))
    inference.check_draft(target, draft, args.prompt_len, args.new_tokens, max(args.num_draft))
    drafts.append((f"{kind}:{arg}", draft))
  return drafts


def measure_speculative(jside, target, drafts, prompts, args):
  """Per draft and num_draft: greedy inference.speculative_tokens against plain decoder_jax
  on the same prompts, after one warm-up run each, the runs interleaved so both see the
  same load. Plain greedy's tokens are the check."""
  from decoder_jax import decoding, inference
  batch, new_tokens = len(prompts), args.new_tokens
  _, plain_tokens = jside.run(prompts)  # warm-up, and the reference tokens
  recs, programs = [], []
  for (label, draft), k in itertools.product(drafts, args.num_draft):
    p = Program(inference.speculative_tokens, target.params, draft.params,
                *greedy_inputs(prompts), model_config=target.config, draft_config=draft.config,
                max_new_tokens=new_tokens, num_draft=k, sampler=decoding.Greedy(), eos_id=None)
    first, out = p.run()
    n, lengths = plain_tokens.shape[1], np.asarray(out.lengths)
    same = (np.asarray(out.tokens)[:, :n] == plain_tokens).all(axis=1) & (lengths == n)
    rec = {"side": f"speculative {label} k={k}", "batch": batch, "draft": label, "num_draft": k,
           "draft_layers": draft.config.num_layers, "first_call_s": first, "runs": [],
           "others_busy": [], "trace_s": p.trace_s, "compile_s": p.compile_s,
           "accepted": int(out.accepted), "proposed": int(out.proposed),
           "iterations": int(out.iterations), "acceptance": int(out.accepted) /
           max(int(out.proposed), 1),
           # tokens a row gains per target pass after the prefill (whose one token is left out)
           "tokens_per_pass": (int(lengths.sum()) - batch) / (batch * max(int(out.iterations), 1)),
           "rows_identical": f"{int(same.sum())}/{len(same)}", "tokens_match": bool(same.all())}
    recs.append(rec)
    programs.append(p)
    print(f"  {rec['side']}: trace {p.trace_s:.2f} s + compile {p.compile_s:.2f} s, warm-up "
          f"{first:.2f} s; accepted {rec['accepted']}/{rec['proposed']} ({rec['acceptance']:.0%}),"
          f" {rec['tokens_per_pass']:.2f} tokens/target pass, tokens = plain greedy: "
          f"{rec['rows_identical']}", flush=True)
  plain_runs = []
  for rep in range(args.repeats):
    with common.Contention() as c:
      plain_runs.append(jside.run(prompts)[0])
    print(f"  decoder_jax (plain) repeat {rep}: {plain_runs[-1]:.3f} s (others busy "
          f"{common.busy_cells([c.others])})")
    for rec, p in zip(recs, programs):
      with common.Contention() as c:
        seconds, out = p.run()
      rec["runs"].append(seconds)
      rec["others_busy"].append(c.others)
      if int(out.accepted) != rec["accepted"]:
        print(f"  WARNING: {rec['side']} accepted {int(out.accepted)} on repeat {rep}")
      print(f"  {rec['side']} repeat {rep}: {seconds:.3f} s (others busy "
            f"{common.busy_cells([c.others])})", flush=True)
  plain = common.median(plain_runs)
  for rec in recs:
    med = common.median(rec["runs"])
    rec.update(plain_runs=plain_runs, plain_ms_per_token=plain / new_tokens * 1e3,
               total_s_median=med, ms_per_token=med / new_tokens * 1e3,
               tok_per_s=batch * new_tokens / med, speedup=plain / med,
               speedup_best=min(plain_runs) / min(rec["runs"]))
  return recs


def measure_shared(params, config, prompt, args):
  """For N in --samples and 1 or --new_tokens steps: greedy generate_tokens of one prompt
  with num_samples=N (one prefill, its cache rows copied) against the prompt repeated as N
  rows (N prefills), their runs interleaved."""
  records = []
  for n, steps in itertools.product(args.samples, dict.fromkeys((1, args.new_tokens))):
    ways = {"shared": (prompt[None], n), "repeated": (np.repeat(prompt[None], n, axis=0), 1)}
    progs = {w: generate_program(params, config, rows, steps, num_samples=per_prompt)
             for w, (rows, per_prompt) in ways.items()}
    tokens = {w: np.asarray(p.run()[1].tokens) for w, p in progs.items()}  # warm-up
    runs, busy = {w: [] for w in ways}, []
    for _ in range(args.repeats):
      for way, p in progs.items():
        with common.Contention() as c:
          runs[way].append(p.run()[0])
        busy.append(c.others)
    shared, repeated = common.median(runs["shared"]), common.median(runs["repeated"])
    rec = {"samples": n, "new_tokens": steps, "shared_s": shared, "repeated_s": repeated,
           "ratio": repeated / shared, "shared_runs": runs["shared"],
           "repeated_runs": runs["repeated"], "others_busy": busy,
           "tokens_identical": bool(np.array_equal(tokens["shared"], tokens["repeated"]))}
    records.append(rec)
    print(f"  N={n}, {steps} new tokens: shared {shared * 1e3:.1f} ms, repeated "
          f"{repeated * 1e3:.1f} ms ({rec['ratio']:.2f}x); tokens identical "
          f"{rec['tokens_identical']}", flush=True)
  return records


# ----------------------------------------------------------------------------- tables


def _f(x, spec):
  return "-" if x is None else format(x, spec)


def _runs(xs):
  return ", ".join(f"{x:.2f}" for x in xs)


def print_table(results, args, env):
  print(f"\n## results ({env['dtype']}, {env['jax_backend']} / torch {env['torch_device']}, "
        f"{env['cores']} cores, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
        f"median of {args.repeats})\n")
  rows = [[r["side"], r["batch"], f"{r['ms_per_step']:.2f}", f"{r['tok_per_s']:,.1f}",
           f"{r['ms_per_step_min']:.2f}",
           _f(r.get("prefill_s_median") and r["prefill_s_median"] * 1e3, ".1f"),
           _f(r.get("decode_only_ms_per_step"), ".2f"), f"{r['first_call_s']:.2f}",
           f"{r['trace_s']:.2f} + {r['compile_s']:.2f}" if "compile_s" in r else "-",
           _runs(r["runs"]), common.busy_cells(r["others_busy"])] for r in results]
  print("\n".join(common.md_table(
      ["side", "batch", "ms/step (total/N)", "new tok/s", "ms/step best run", "prefill ms",
       "decode-only ms/step", "first call s", "trace + compile s", "runs s", "others busy"],
      rows)))
  by = {(r["side"], r["batch"]): r for r in results}
  lines = [f"- batch {r['batch']}: decoder_jax / {o['side']} ms per step = "
           f"{r['ms_per_step'] / o['ms_per_step']:.2f}x (medians), "
           f"{r['ms_per_step_min'] / o['ms_per_step_min']:.2f}x (best runs)"
           for r in results if r["side"] == "decoder_jax"
           for o in (by.get((s, r["batch"])) for s in ("hf-static", "hf-dynamic")) if o]
  if lines:
    print("\n" + "\n".join(lines))
  print("\nms/step = median total generate seconds / new_tokens (prefill included); 'best run' "
        "uses the fastest run instead (the robust figure when other processes share the cores: "
        "torch's OpenMP threads slow down sharply when oversubscribed); decode-only = (total - "
        "prefill) / (new_tokens - 1). decoder_jax 'trace + compile' is jit lowering + XLA "
        "compile of the one prefill + while_loop program, timed apart from the runs; 'first "
        "call' is the warm-up run. 'others busy' = share of all cores used by other processes "
        "during each timed run.")


def print_features(results, speculative, shared, args):
  """The speculative and shared-prefix tables, then the summary of every row."""
  if speculative:
    print(f"\n## speculative decoding (greedy, median of {args.repeats}, plain decoder_jax runs "
          "interleaved with them)\n")
    print("\n".join(common.md_table(
        ["side", "batch", "draft layers", "ms/token", "tok/s", "plain decoder_jax ms/token",
         "speed-up (median)", "speed-up (best runs)", "acceptance", "tokens / target pass",
         "target passes", "tokens = plain greedy", "trace + compile s", "runs s"],
        [[r["side"], r["batch"], r["draft_layers"], f"{r['ms_per_token']:.2f}",
          f"{r['tok_per_s']:,.1f}", f"{r['plain_ms_per_token']:.2f}", f"{r['speedup']:.2f}x",
          f"{r['speedup_best']:.2f}x",
          f"{r['acceptance']:.1%} ({r['accepted']}/{r['proposed']})",
          f"{r['tokens_per_pass']:.2f}", r["iterations"], r["rows_identical"],
          f"{r['trace_s']:.2f} + {r['compile_s']:.2f}", _runs(r["runs"])]
         for r in speculative])))
    print("\nms/token = median seconds / new_tokens (prefill included, as above); speed-up = "
          "plain decoder_jax median / speculative median (best runs: fastest / fastest); "
          "acceptance = draft tokens kept / proposed; tokens / target pass = new tokens per "
          "row after the prefill's first / target forward passes (k + 1 at most).")
  if shared:
    print(f"\n## shared prefixes: one prompt of {args.prompt_len} tokens, N rows (greedy, "
          f"median of {args.repeats})\n")
    print("\n".join(common.md_table(
        ["N", "new tokens", "shared: 1 prefill, num_samples=N (ms)",
         "repeated: N rows, N prefills (ms)", "repeated / shared", "tokens identical",
         "others busy"],
        [[r["samples"], r["new_tokens"], f"{r['shared_s'] * 1e3:,.1f}",
          f"{r['repeated_s'] * 1e3:,.1f}", f"{r['ratio']:.2f}x", r["tokens_identical"],
          common.busy_cells(r["others_busy"])] for r in shared])))
    print("\nnew tokens = 1: the program is the prefill plus choosing one token (no decode "
          "step). Larger: the same plus the decode of N rows, which both ways share.")
  if speculative or len(results) > 1:
    plain = {r["batch"]: r["ms_per_step"] for r in results if r["side"] == "decoder_jax"}
    rows = [(r["side"], r["batch"], r["ms_per_step"], r["tok_per_s"],
             r["ms_per_step"] / plain[r["batch"]] if r["batch"] in plain else None)
            for r in results]  # speculative rows: against the plain runs beside them
    rows += [(r["side"], r["batch"], r["ms_per_token"], r["tok_per_s"], 1 / r["speedup"])
             for r in speculative]
    print(f"\n## summary: ms/token and tokens/s ({args.new_tokens} new tokens, prefill "
          "included)\n")
    print("\n".join(common.md_table(
        ["side", "batch", "ms/token", "tokens/s", "vs decoder_jax (time ratio)"],
        [[s, b, f"{ms:.2f}", f"{tps:,.1f}", _f(ratio, ".2f") + ("x" if ratio else "")]
         for s, b, ms, tps, ratio in sorted(rows, key=lambda x: x[1])])))
    print("\nms/token = median generate seconds / new tokens per row (at batch B one step "
          "gives B tokens); tokens/s = batch x new tokens / seconds. Time ratio < 1: faster "
          "than plain decoder_jax.")


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
  print_table(results, args, env)
  print_features(results, speculative, shared, args)
  if checks:
    print("\nchecks: " + json.dumps(checks, indent=2))


# ----------------------------------------------------------------------------- main


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
  for k, v in env.items():
    print(f"  {k}: {v}")
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
    # No end-of-sequence token: HF neither stops at it nor (min_new_tokens) masks it, so
    # both sides decode the same raw greedy continuation.
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
    prompts = all_prompts[:batch]
    print(f"\n## batch {batch}", flush=True)
    rec = {s.name: {"side": s.name, "batch": batch, "runs": [], "others_busy": []} for s in sides}
    for s in sides:  # compile + warm-up
      r = rec[s.name]
      r.update(s.prepare(prompts))
      r["first_call_s"], tokens[s.name, batch] = s.run(prompts)
      print(f"  {s.name}: warm-up run {r['first_call_s']:.2f} s" + "".join(
          f", {k} {r[k]:.2f} s" for k in ("trace_s", "compile_s") if k in r), flush=True)
    for rep in range(args.repeats):  # the sides interleaved
      for s in sides:
        with common.Contention() as c:
          seconds, toks = s.run(prompts)
        rec[s.name]["runs"].append(seconds)
        rec[s.name]["others_busy"].append(c.others)
        if not np.array_equal(toks, tokens[s.name, batch]):
          print(f"  WARNING: {s.name} produced different tokens on repeat {rep}")
        print(f"  {s.name} repeat {rep}: {seconds:.3f} s ({seconds / args.new_tokens * 1e3:.2f}"
              f" ms/step; others busy {common.busy_cells([c.others])})", flush=True)
    for s in (sides if not args.no_prefill else []):
      s.run(prompts, 1)  # compile / warm
      rec[s.name]["prefill_runs"] = [s.run(prompts, 1)[0] for _ in range(args.repeats)]
      print(f"  {s.name} prefill: median {common.median(rec[s.name]['prefill_runs']) * 1e3:.1f}"
            " ms", flush=True)
    if args.profile_dir and not args.skip_jax:
      path = os.path.join(args.profile_dir, f"batch{batch}")
      with jax.profiler.trace(path):
        seconds, _ = sides[0].run(prompts)
      print(f"  profile of one decoder_jax run ({seconds:.3f} s) in {path}", flush=True)
    for r in rec.values():
      med = r["total_s_median"] = common.median(r["runs"])
      r.update(ms_per_step=med / args.new_tokens * 1e3, tok_per_s=batch * args.new_tokens / med,
               ms_per_step_min=min(r["runs"]) / args.new_tokens * 1e3)
      if "prefill_runs" in r:
        r["prefill_s_median"] = common.median(r["prefill_runs"])
        r["decode_only_ms_per_step"] = (med - r["prefill_s_median"]) / (args.new_tokens - 1) * 1e3
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
    drafts = make_drafts(args.speculative, target, dtype, args)
    for batch in args.speculative_batches:
      print(f"\n## speculative decoding, batch {batch}: drafts {[d for d, _ in drafts]}, "
            f"num_draft {args.num_draft}", flush=True)
      speculative += measure_speculative(sides[0], target, drafts, all_prompts[:batch], args)
  shared = []
  if args.samples and not args.skip_jax:
    print(f"\n## shared prefixes: N in {args.samples}", flush=True)
    shared = measure_shared(params, config, all_prompts[0], args)

  print_table(results, args, env)
  print_features(results, speculative, shared, args)
  if args.json_out:
    with open(args.json_out, "w") as f:
      json.dump({"env": env, "args": vars(args), "results": results, "checks": checks,
                 "speculative": speculative, "shared_prefix": shared}, f, indent=2, default=str)
    print(f"\nwrote {args.json_out}")


def parse_speculative(text: str) -> list[tuple[str, str]]:
  """'self:10,draft:gguf:/m.gguf' -> [("self", "10"), ("draft", "gguf:/m.gguf")]."""
  specs = [item.partition(":")[::2] for item in filter(None, map(str.strip, text.split(",")))]
  for kind, arg in specs:
    if not (kind == "self" and arg.isdigit() or kind == "draft" and arg):
      raise argparse.ArgumentTypeError(f"{kind}:{arg}: give self:LAYERS or draft:SOURCE")
  return specs


def parse_args(argv=None):
  ints = lambda text: [int(x) for x in text.split(",") if x.strip()]  # noqa: E731
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  add = ap.add_argument
  add("--batches", default="1,8,64", type=ints, help="comma-separated batch sizes")
  add("--new_tokens", type=int, default=256)
  add("--prompt_len", type=int, default=32)
  add("--repeats", type=int, default=3, help="timed runs per side and batch after a warm-up")
  add("--dtype", default="auto", choices=("auto", "float32", "bfloat16"), help="compute, "
      "parameter and cache dtype of both sides (auto: float32 on CPU, else bfloat16)")
  add("--matmul_dtype", default=None, choices=(None, "bfloat16"), help="decoder_jax's "
      "model.matmul_dtype (bf16 operands, float32 sums); HF stays in --dtype")
  add("--cache_block", type=int, default=None, help="generate_tokens(cache_block=N): a cache "
      "grown N slots at a time (0 or unset: one full-length cache)")
  add("--hf_dynamic", action="store_true", help="also time HF's default dynamic cache")
  add("--skip_jax", action="store_true")
  add("--skip_hf", action="store_true")
  add("--no_prefill", action="store_true", help="do not time prefill apart")
  add("--no_cross_check", action="store_true")
  add("--threads", type=int, default=0, help="torch threads (0: all cores)")
  add("--seed", type=int, default=0, help="seed of the weights and prompts")
  add("--profile_dir", default=None, help="a jax.profiler trace of one decoder_jax run per batch")
  add("--pretrained", default=None, metavar="SOURCE", help="real weights and chat prompts "
      "(a load_pretrained source, e.g. fetch:smollm2-135m-instruct)")
  add("--speculative", default=[], type=parse_speculative, help="comma-separated drafts: "
      "self:N (the target's first N layers) or draft:SOURCE (load_pretrained)")
  add("--num_draft", default="4", type=ints, help="comma-separated draft lengths k")
  add("--speculative_batches", default="1", type=ints, help="batches of the speculative rows")
  add("--samples", default="16", type=ints, help="comma-separated N of the shared-prefix "
      "measurement (N=1 is added; empty: skip it)")
  add("--json_out", default=None)
  add("--report", nargs="+", default=None, metavar="JSON",
      help="print the tables of earlier --json_out files and exit (runs nothing)")
  args = ap.parse_args(argv)
  args.samples = sorted({1, *args.samples}) if args.samples else []
  if args.speculative and (args.skip_jax or not args.num_draft or min(args.num_draft) < 1):
    ap.error("--speculative needs the decoder_jax side and --num_draft >= 1")
  if args.new_tokens < 2 or args.prompt_len < 1 or args.repeats < 1 or not args.batches:
    ap.error("need --new_tokens >= 2, --prompt_len >= 1, --repeats >= 1, some --batches")
  return args


if __name__ == "__main__":
  sys.exit(main())
