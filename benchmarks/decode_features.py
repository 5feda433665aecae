"""The decode benchmark's feature measurements (imported by decode.py, not run alone).

  chat_prompts        real prompts for --pretrained: chat-formatted questions, cut to
                      --prompt_len tokens;
  measure_speculative greedy speculative decoding (--speculative) against plain greedy
                      decoder_jax, the two timed interleaved in one loop;
  measure_shared      --samples: N rows sharing one prompt's prefill (num_samples=N)
                      against the prompt repeated as N rows.
Each has its table printer; decode.py's summary table merges their rows with its own.
"""

from __future__ import annotations

import itertools
import statistics
import time

import numpy as np

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
# Earlier turns prepended (most recent last) while a prompt is shorter than --prompt_len.
EARLIER_TURNS = [
    ("Hi there!", "Hello! How can I help you today?"),
    ("Can you answer a few questions for me?", "Of course. Ask away and I will do my best."),
    ("Please keep your answers short.", "Sure, I will keep them brief and to the point."),
]


def chat_prompts(tokenizer, rows: int, prompt_len: int) -> np.ndarray:
  """int32 [rows, prompt_len]: row r is QUESTIONS[r % 16] as the last user turn through the
  tokenizer's chat template (its default system message included), ending with the
  assistant cue. Every row has exactly prompt_len tokens, so both sides take unpadded
  prompts: a longer one keeps its last prompt_len tokens (the start of the system message
  goes first), a shorter one gets earlier turns of a fixed small talk before it."""
  from decoder_jax.inference import encode_chat
  out = np.zeros((rows, prompt_len), np.int32)
  for r in range(rows):
    question = {"role": "user", "content": QUESTIONS[r % len(QUESTIONS)]}
    earlier, turns = [], itertools.cycle(reversed(EARLIER_TURNS))
    ids = encode_chat(tokenizer, [question])
    while len(ids) < prompt_len:
      user, assistant = next(turns)
      earlier = [{"role": "user", "content": user},
                 {"role": "assistant", "content": assistant}] + earlier
      ids = encode_chat(tokenizer, earlier + [question])
    out[r] = ids[-prompt_len:]
  return out


def _median(xs):
  return statistics.median(xs) if xs else None


def _compile(fn, *args, **static):
  """Lowers and compiles `fn` for these arguments: (compiled, trace_s, compile_s)."""
  t0 = time.perf_counter()
  lowered = fn.lower(*args, **static)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  return compiled, t1 - t0, time.perf_counter() - t1


def _timed(compiled, *args):
  """(seconds, output) of one call of a compiled program, its inputs already on device."""
  import jax
  jax.block_until_ready(args)
  t0 = time.perf_counter()
  out = jax.block_until_ready(compiled(*args))
  return time.perf_counter() - t0, out


def _busy(c):
  return "?" if c.others is None else f"{c.others:.0%}"


# ---------------------------------------------------------------------------------------
# Speculative decoding


def parse_speculative(text: str) -> list[tuple[str, str]]:
  """'self:10,draft:gguf:/m.gguf' -> [("self", "10"), ("draft", "gguf:/m.gguf")]."""
  specs = []
  for item in filter(None, (s.strip() for s in text.split(","))):
    kind, _, arg = item.partition(":")
    if kind == "self" and arg.isdigit():
      specs.append((kind, arg))
    elif kind == "draft" and arg:
      specs.append((kind, arg))
    else:
      raise ValueError(f"--speculative {item!r}: give self:LAYERS or draft:SOURCE")
  return specs


def make_drafts(specs, trained, dtype: str):
  """[(label, TrainedModel)] per --speculative entry: self-drafts share the target's
  arrays; a separate draft is loaded with load_pretrained in the run's dtype."""
  from decoder_jax import inference, load_pretrained
  drafts = []
  for kind, arg in specs:
    if kind == "self":
      drafts.append((f"self:{arg}", inference.self_draft(trained, int(arg))))
    else:
      draft = load_pretrained(arg, dtype=dtype)
      if draft.config.vocab_size != trained.config.vocab_size:
        raise ValueError(f"draft {arg}: vocabulary {draft.config.vocab_size} != the target's "
                         f"{trained.config.vocab_size}")
      drafts.append((f"draft:{arg}", draft))
  return drafts


class SpeculativeSide:
  """Greedy inference.speculative_tokens with one draft and num_draft, compiled ahead of
  time like decode.py's JaxSide; no end-of-sequence stop, as on the other sides."""

  def __init__(self, target, draft_label, draft, num_draft, new_tokens):
    self.target, self.draft, self.num_draft = target, draft, num_draft
    self.draft_label, self.new_tokens = draft_label, new_tokens
    self.name = f"speculative {draft_label} k={num_draft}"
    self.compiled = {}

  def _inputs(self, prompts):
    import jax
    import jax.numpy as jnp
    prompts = jnp.asarray(prompts, jnp.int32)
    lengths = jnp.full((prompts.shape[0],), prompts.shape[1], jnp.int32)
    return self.target.params, self.draft.params, prompts, lengths, jax.random.key(0)

  def prepare(self, prompts):
    from decoder_jax import decoding, inference
    compiled, trace_s, compile_s = _compile(
        inference.speculative_tokens, *self._inputs(prompts), model_config=self.target.config,
        draft_config=self.draft.config, max_new_tokens=self.new_tokens,
        num_draft=self.num_draft, sampler=decoding.Greedy(), eos_id=None)
    self.compiled[prompts.shape[0]] = compiled
    return {"trace_s": trace_s, "compile_s": compile_s}

  def run(self, prompts):
    """(seconds, {tokens, lengths, accepted, proposed, iterations}) of one timed run."""
    seconds, out = _timed(self.compiled[prompts.shape[0]], *self._inputs(prompts))
    return seconds, {"tokens": np.asarray(out.tokens), "lengths": np.asarray(out.lengths),
                     "accepted": int(out.accepted), "proposed": int(out.proposed),
                     "iterations": int(out.iterations)}


def measure_speculative(jside, target, drafts, num_drafts, prompts, repeats, watch):
  """Per draft and num_draft, one record: speculative decoding of `target` (a
  TrainedModel) vs plain decoder_jax (jside, decode.py's JaxSide, on the same weights) on
  `prompts`, after one warm-up run each, plain and speculative
  runs interleaved so both see the same load. Plain greedy's tokens are the check."""
  batch, new_tokens = prompts.shape[0], jside.args.new_tokens
  if batch not in jside.compiled:
    jside.prepare(prompts)
  _, plain_tokens = jside.run(prompts)  # warm-up, and the reference tokens
  sides = [SpeculativeSide(target, label, draft, k, new_tokens)
           for label, draft in drafts for k in num_drafts]
  recs = {}
  for s in sides:
    info = s.prepare(prompts)
    first, out = s.run(prompts)
    recs[s.name] = rec = {"side": s.name, "batch": batch, "draft": s.draft_label,
                          "num_draft": s.num_draft, "draft_layers": s.draft.config.num_layers,
                          "first_call_s": first, "runs": [], "others_busy": [], **info,
                          **_acceptance(out, batch), **_agreement(out, plain_tokens)}
    print(f"  {s.name}: trace {info['trace_s']:.2f} s + compile {info['compile_s']:.2f} s, "
          f"warm-up {first:.2f} s; accepted {out['accepted']}/{out['proposed']} "
          f"({rec['acceptance']:.0%}), {rec['tokens_per_pass']:.2f} tokens/target pass, "
          f"tokens = plain greedy: {rec['rows_identical']}", flush=True)
  plain_runs = []
  for rep in range(repeats):
    with watch() as c:
      seconds, _ = jside.run(prompts)
    plain_runs.append(seconds)
    print(f"  decoder_jax (plain) repeat {rep}: {seconds:.3f} s (others busy {_busy(c)})")
    for s in sides:
      with watch() as c:
        seconds, out = s.run(prompts)
      recs[s.name]["runs"].append(seconds)
      recs[s.name]["others_busy"].append(c.others)
      if out["accepted"] != recs[s.name]["accepted"]:
        print(f"  WARNING: {s.name} accepted {out['accepted']} on repeat {rep}")
      print(f"  {s.name} repeat {rep}: {seconds:.3f} s (others busy {_busy(c)})", flush=True)
  plain = _median(plain_runs)
  for rec in recs.values():
    med = _median(rec["runs"])
    rec.update(plain_runs=plain_runs, plain_ms_per_token=plain / new_tokens * 1e3,
               total_s_median=med, ms_per_token=med / new_tokens * 1e3,
               tok_per_s=batch * new_tokens / med, speedup=plain / med,
               speedup_best=min(plain_runs) / min(rec["runs"]))
  return list(recs.values())


def _acceptance(out, batch):
  """Acceptance = accepted / proposed draft tokens; tokens per target pass = the tokens
  a row gains per target forward pass after the prefill (whose one token is left out),
  averaged over rows: (sum(lengths) - rows) / (rows * iterations)."""
  passes = max(out["iterations"], 1)
  return {"accepted": out["accepted"], "proposed": out["proposed"],
          "iterations": out["iterations"],
          "acceptance": out["accepted"] / max(out["proposed"], 1),
          "tokens_per_pass": (int(out["lengths"].sum()) - batch) / (batch * passes)}


def _agreement(out, plain_tokens):
  n = plain_tokens.shape[1]
  same = (out["tokens"][:, :n] == plain_tokens).all(axis=1) & (out["lengths"] == n)
  return {"rows_identical": f"{int(same.sum())}/{len(same)}", "tokens_match": bool(same.all())}


def print_speculative_table(records, repeats):
  print(f"\n## speculative decoding (greedy, median of {repeats}, plain decoder_jax runs "
        "interleaved with them)\n")
  print("| side | batch | draft layers | ms/token | tok/s | plain decoder_jax ms/token | "
        "speed-up (median) | speed-up (best runs) | acceptance | tokens / target pass | "
        "target passes | tokens = plain greedy | trace + compile s | runs s |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  for r in records:
    print(f"| {r['side']} | {r['batch']} | {r['draft_layers']} | {r['ms_per_token']:.2f} | "
          f"{r['tok_per_s']:,.1f} | {r['plain_ms_per_token']:.2f} | {r['speedup']:.2f}x | "
          f"{r['speedup_best']:.2f}x | {r['acceptance']:.1%} ({r['accepted']}/{r['proposed']}) | "
          f"{r['tokens_per_pass']:.2f} | {r['iterations']} | {r['rows_identical']} | "
          f"{r['trace_s']:.2f} + {r['compile_s']:.2f} | "
          f"{', '.join(f'{x:.2f}' for x in r['runs'])} |")
  print("\nms/token = median seconds / new_tokens (prefill included, as above); speed-up = "
        "plain decoder_jax median / speculative median (best runs: fastest / fastest); "
        "acceptance = draft tokens kept / proposed; tokens / target pass = new tokens per "
        "row after the prefill's first / target forward passes (k + 1 at most).")


# ---------------------------------------------------------------------------------------
# Shared prefixes (num_samples)


def measure_shared(params, config, prompt, samples, new_tokens, repeats, watch):
  """For N in `samples` and steps in (1, new_tokens): greedy generate_tokens of one prompt
  with num_samples=N (one prefill, its cache rows copied) against the prompt repeated as
  N rows (N prefills), the two interleaved. One record per (N, steps)."""
  import jax
  import jax.numpy as jnp
  from decoder_jax import decoding, inference
  key = jax.random.key(0)
  one = jnp.asarray(prompt[None], jnp.int32)
  records = []
  for n in samples:
    for steps in dict.fromkeys((1, new_tokens)):
      ways = {"shared": (one, n), "repeated": (jnp.repeat(one, n, axis=0), 1)}
      progs, tokens, runs = {}, {}, {w: [] for w in ways}
      for way, (prompts, per_prompt) in ways.items():
        lengths = jnp.full((prompts.shape[0],), prompts.shape[1], jnp.int32)
        args = (params, prompts, lengths, key)
        compiled, _, _ = _compile(inference.generate_tokens, *args, model_config=config,
                                  max_new_tokens=steps, sampler=decoding.Greedy(),
                                  eos_id=None, num_samples=per_prompt)
        progs[way] = (compiled, args)
        tokens[way] = np.asarray(_timed(compiled, *args)[1].tokens)  # warm-up
      busy = []
      for _ in range(repeats):
        for way, (compiled, args) in progs.items():
          with watch() as c:
            runs[way].append(_timed(compiled, *args)[0])
          busy.append(c.others)
      shared, repeated = _median(runs["shared"]), _median(runs["repeated"])
      rec = {"samples": n, "new_tokens": steps, "shared_s": shared, "repeated_s": repeated,
             "ratio": repeated / shared, "shared_runs": runs["shared"],
             "repeated_runs": runs["repeated"], "others_busy": busy,
             "tokens_identical": bool(np.array_equal(tokens["shared"], tokens["repeated"]))}
      records.append(rec)
      print(f"  N={n}, {steps} new tokens: shared {shared * 1e3:.1f} ms, repeated "
            f"{repeated * 1e3:.1f} ms ({rec['ratio']:.2f}x); tokens identical "
            f"{rec['tokens_identical']}", flush=True)
  return records


def print_shared_table(records, prompt_len, repeats):
  print(f"\n## shared prefixes: one prompt of {prompt_len} tokens, N rows (greedy, median of "
        f"{repeats})\n")
  print("| N | new tokens | shared: 1 prefill, num_samples=N (ms) | repeated: N rows, N "
        "prefills (ms) | repeated / shared | tokens identical | others busy |")
  print("|---|---|---|---|---|---|---|")
  for r in records:
    busy = [o for o in r["others_busy"] if o is not None]
    print(f"| {r['samples']} | {r['new_tokens']} | {r['shared_s'] * 1e3:,.1f} | "
          f"{r['repeated_s'] * 1e3:,.1f} | {r['ratio']:.2f}x | {r['tokens_identical']} | "
          f"{', '.join(f'{o:.0%}' for o in busy) or '?'} |")
  print("\nnew tokens = 1: the program is the prefill plus choosing one token (no decode "
        "step). Larger: the same plus the decode of N rows, which both ways share.")


# ---------------------------------------------------------------------------------------


def print_summary(results, speculative, new_tokens):
  """The compact table: ms/token and tokens/s of every side and batch, speculative rows
  with them, and each against decoder_jax (plain) at the same batch."""
  print(f"\n## summary: ms/token and tokens/s ({new_tokens} new tokens, prefill included)\n")
  print("| side | batch | ms/token | tokens/s | vs decoder_jax (time ratio) |")
  print("|---|---|---|---|---|")
  plain = {r["batch"]: r for r in results if r["side"] == "decoder_jax"}
  rows = [(r["side"], r["batch"], r["ms_per_step"], r["tok_per_s"],
           r["ms_per_step"] / plain[r["batch"]]["ms_per_step"] if r["batch"] in plain else None)
          for r in results]
  # Speculative rows: against the plain runs interleaved with them.
  rows += [(r["side"], r["batch"], r["ms_per_token"], r["tok_per_s"], 1 / r["speedup"])
           for r in speculative]
  for side, batch, ms, tps, ratio in sorted(rows, key=lambda x: x[1]):
    print(f"| {side} | {batch} | {ms:.2f} | {tps:,.1f} | "
          f"{'-' if ratio is None else f'{ratio:.2f}x'} |")
  print("\nms/token = median generate seconds / new tokens per row (at batch B one step "
        "gives B tokens); tokens/s = batch x new tokens / seconds. Time ratio < 1: faster than "
        "plain decoder_jax.")
