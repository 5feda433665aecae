"""Decode speed, side by side: decoder_jax vs. Hugging Face transformers `generate`.

SmolLM2-135M architecture with random weights (30 layers, width 576, 9 query / 3
key-value heads, head_dim 64, SwiGLU 1536, vocabulary 49,152, tied embeddings, RoPE
theta 100000, RMSNorm eps 1e-5). Every row gets a random prompt of --prompt_len tokens
(fixed seed; the batch-1 prompt is row 0 of the largest batch), then --new_tokens
greedy tokens with no end-of-sequence stop.

--pretrained=SOURCE (e.g. fetch:smollm2-135m-instruct, gguf:FILE; any source of
decoder_jax.load_pretrained) runs everything on those weights instead: decoder_jax loads
them, and they are copied into the Hugging Face model exactly as the random init is (so
both sides hold the same float32 arrays; HF does not re-read the file). The prompts are
then real: row r is one of 16 questions (decode_features.QUESTIONS, r mod 16) sent as a
user turn through the tokenizer's chat template (default system message and assistant
cue included), cut to its last --prompt_len tokens, or with earlier small-talk turns put
before it where it is shorter. Still no end-of-sequence stop: after its answer's
<|im_end|> the model goes on (HF's eos is unset so it does not stop or mask it either).

Sides, in one process, on the same weights (decoder_jax's weights are copied into the
Hugging Face model):
  decoder_jax   decoder_jax.inference.generate_tokens (or _generate_window if that is
                what exists): one jitted program = prefill + lax.while_loop over the
                static KV cache. Compiled ahead of time (lower + compile, timed apart),
                each run timed with jax.block_until_ready.
  hf-static     LlamaForCausalLM.generate(..., cache_implementation="static"),
                under torch.inference_mode().
  hf-dynamic    the same with the default DynamicCache (only with --hf_dynamic).

Per side and batch: median wall seconds of --repeats runs after one warm-up run (runs
of the sides are interleaved), and from it ms per step = total / new_tokens (prefill
included: the decoder_jax program cannot be split) and new tokens/s = batch *
new_tokens / total. Prefill is timed apart (decoder_jax: a separate jit of the same
cached forward on the prompt; HF: generate with max_new_tokens=1), which gives
decode-only ms per step = (total - prefill) / (new_tokens - 1). "first call" is the
warm-up run (HF: includes any torch.compile that generate triggers itself, which it does
for a static cache on CUDA but not on CPU); decoder_jax's trace and XLA compile times
are separate columns.

Correctness cross-check (float32, batch 1, on by default): do both sides produce the
same greedy tokens? And how far apart are their logits on the same 1 x (prompt +
generated) sequence, teacher-forced? Disable with --no_cross_check.

--speculative=self:8,self:16,draft:SOURCE with --num_draft=2,4: greedy speculative
decoding (decoder_jax.inference.speculative_tokens; self:N = inference.self_draft, the
target's first N layers; draft:SOURCE = a separate model from load_pretrained) at the
batches of --speculative_batches (default 1), each draft x num_draft against plain
greedy decoder_jax on the same prompts, their runs interleaved: ms/token, tokens/s,
speed-up, acceptance (accepted / proposed draft tokens), tokens per target pass
((new tokens - 1) per row / target forward passes, averaged over rows) and whether the
tokens equal plain greedy's. Meaningful with --pretrained only (random weights accept
at chance).

--samples=16 (default; "" for none): shared prefixes. For N in 1 and these, one prompt
decoded as N rows by generate_tokens(num_samples=N) (one prefill whose cache rows are
copied) against the prompt repeated as N rows (N prefills), greedy, interleaved runs:
with max_new_tokens=1 (nearly all prefill) and with --new_tokens (end to end).

Tables: the per-side table below, the speculative and shared-prefix tables, and a summary
of ms/token and tokens/s for every side and batch (speculative rows included).

  python benchmarks/decode.py                               # batches 1,8,64, 3 repeats
  python benchmarks/decode.py --pretrained=fetch:smollm2-135m-instruct --new_tokens 64 \
      --speculative self:8,self:16 --num_draft 2,4     # real weights and prompts
  python benchmarks/decode.py --batches 64 --repeats 1 --json_out /tmp/decode64.json
  python benchmarks/decode.py --dtype bfloat16 --hf_dynamic   # on a GPU
  python benchmarks/decode.py --profile_dir /tmp/trace        # jax.profiler trace of one run
  python benchmarks/decode.py --report /tmp/decode1.json /tmp/decode64.json   # one table
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

import decode_features as features  # benchmarks/decode_features.py
from machine import busy_cpu_seconds, cores, version  # benchmarks/machine.py

# Same dims as decoder_jax's "smollm2-135m" preset; the HF config is built from these.
PRESET = "smollm2-135m"


class Contention:
  """How busy *other* processes kept the cores while a block ran (share of all cores)."""

  def __enter__(self):
    self.busy0, self.own0, self.t0 = busy_cpu_seconds(), _own_cpu(), time.perf_counter()
    return self

  def __exit__(self, *exc):
    wall = time.perf_counter() - self.t0
    busy1, own1 = busy_cpu_seconds(), _own_cpu()
    self.others = None
    if self.busy0 is not None and wall > 0:
      self.others = max(0.0, (busy1 - self.busy0) - (own1 - self.own0)) / (wall * cores())
    return False


def _own_cpu() -> float:
  t = os.times()
  return t.user + t.system


def _median(xs):
  return statistics.median(xs) if xs else None


# ---------------------------------------------------------------------------------------
# decoder_jax side


def jax_generate_fn():
  """The jitted generate of decoder_jax.inference, by whichever name it has now."""
  try:
    from decoder_jax import inference
  except ImportError as e:  # e.g. a GPU box without ml_collections / orbax
    print(f"WARNING: cannot import decoder_jax.inference ({e}); using a local copy of "
          "its _generate_window", flush=True)
    return _local_generate_window(), "local copy of inference._generate_window"
  for name in ("generate_tokens", "_generate_window"):
    fn = getattr(inference, name, None)
    if fn is not None:
      return fn, f"decoder_jax.inference.{name}"
  raise RuntimeError("decoder_jax.inference has neither generate_tokens nor _generate_window")


def _local_generate_window():
  import jax
  import jax.numpy as jnp
  from decoder_jax import decoding
  from decoder_jax.model import Decoder, init_cache

  @functools.partial(jax.jit, static_argnames=("model_config", "max_new_tokens", "sampler",
                                               "eos_id"))
  def generate_tokens(params, prompts, prompt_lengths, rng, *, model_config, max_new_tokens,
                      sampler, eos_id):
    model = Decoder(model_config)

    def tokens_to_logits(tokens, positions, cache):
      return model.apply({"params": params}, tokens, positions=positions, cache=cache)

    cache = init_cache(model_config, prompts.shape[0], prompts.shape[1] + max_new_tokens,
                       jnp.dtype(model_config.dtype))
    return decoding.generate(tokens_to_logits, cache, prompts, prompt_lengths,
                             max_new_tokens=max_new_tokens, sampler=sampler, rng=rng,
                             eos_id=eos_id)

  return generate_tokens


def _tokens_of(result):
  tokens = getattr(result, "tokens", result)
  return np.asarray(tokens)


class JaxSide:
  name = "decoder_jax"

  def __init__(self, args, config, params):
    import jax
    self.jax = jax
    self.args, self.config, self.params = args, config, params
    self.fn, self.fn_name = jax_generate_fn()
    self.compiled = {}
    self.info = {}

  def _inputs(self, prompts):
    jnp = self.jax.numpy
    prompts = jnp.asarray(prompts, jnp.int32)
    lengths = jnp.full((prompts.shape[0],), prompts.shape[1], jnp.int32)
    return prompts, lengths, self.jax.random.key(0)

  def prepare(self, prompts):
    """Traces and compiles for this batch; returns {trace_s, compile_s}."""
    from decoder_jax import decoding
    batch = prompts.shape[0]
    args = self._inputs(prompts)
    t0 = time.perf_counter()
    extra = {}
    if self.args.cache_block is not None:  # 0: one full-length cache
      extra["cache_block"] = self.args.cache_block or None
    lowered = self.fn.lower(self.params, *args, model_config=self.config,
                            max_new_tokens=self.args.new_tokens, sampler=decoding.Greedy(),
                            eos_id=None, **extra)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    self.compiled[batch] = compiled
    self.info[batch] = {"trace_s": t1 - t0, "compile_s": t2 - t1}
    return self.info[batch]

  def run(self, prompts):
    """One timed generate; returns (seconds, new tokens [batch, new_tokens])."""
    compiled = self.compiled[prompts.shape[0]]
    args = self._inputs(prompts)
    self.jax.block_until_ready(args)
    t0 = time.perf_counter()
    out = self.jax.block_until_ready(compiled(self.params, *args))
    seconds = time.perf_counter() - t0
    return seconds, _tokens_of(out)

  def prefill_fn(self):
    """Just the prefill of the generate program: cached forward over the prompt + argmax."""
    if getattr(self, "_prefill", None) is None:
      jax, jnp = self.jax, self.jax.numpy
      from decoder_jax.model import Decoder, init_cache
      config, new_tokens = self.config, self.args.new_tokens

      @jax.jit
      def prefill(params, prompts):
        batch, length = prompts.shape
        cache = init_cache(config, batch, length + new_tokens, jnp.dtype(config.dtype))
        last = jnp.full((batch,), length - 1, jnp.int32)  # logits of the last token only
        # empty_cache: positions 0..length-1, the chunk's own keys only.
        logits, cache = Decoder(config).apply({"params": params}, prompts, cache=cache,
                                              logits_at=last, empty_cache=True)
        return jnp.argmax(logits, axis=-1), cache

      self._prefill = prefill
    return self._prefill

  def run_prefill(self, prompts):
    fn = self.prefill_fn()
    prompts = self.jax.numpy.asarray(prompts, self.jax.numpy.int32)
    t0 = time.perf_counter()
    self.jax.block_until_ready(fn(self.params, prompts))
    return time.perf_counter() - t0

  def logits(self, sequence):
    """Teacher-forced logits [1, T, vocab] of one sequence (no cache), float32 numpy."""
    from decoder_jax.model import Decoder
    jnp = self.jax.numpy
    fn = self.jax.jit(lambda p, t: Decoder(self.config).apply({"params": p}, t)[0])
    return np.asarray(fn(self.params, jnp.asarray(sequence, jnp.int32)).astype(jnp.float32))


# ---------------------------------------------------------------------------------------
# Hugging Face side


def hf_config(cfg):
  """A LlamaConfig with decoder_jax's dims (transformers 5 keeps rope_theta in rope_parameters)."""
  from transformers import LlamaConfig
  common = dict(
      vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=cfg.hidden_width,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim, hidden_act="silu",
      max_position_embeddings=max(cfg.max_length, 288), rms_norm_eps=cfg.norm_eps,
      tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False,
      initializer_range=cfg.init_std, bos_token_id=1, eos_token_id=2, pad_token_id=0)
  try:
    config = LlamaConfig(rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
                         **common)
  except TypeError:  # transformers 4.x
    config = LlamaConfig(rope_theta=cfg.rope_theta, **common)
  rope = getattr(config, "rope_parameters", None) or {}
  theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
  if theta != cfg.rope_theta:
    raise RuntimeError(f"HF rope theta {theta} != {cfg.rope_theta}")
  return config


def _to_torch(x, dtype, device):
  import torch
  return torch.from_numpy(np.array(x, np.float32, copy=True, order="C")).to(device, dtype)


def copy_params_into_hf(params, cfg, model):
  """Loads decoder_jax params (kernels [in, out]) into a LlamaForCausalLM ([out, in])."""
  import torch
  p = params
  dtype, device = model.dtype, model.device
  width = cfg.width
  if cfg.scan_layers:
    layer = lambda i: __import__("jax").tree.map(lambda a: a[i], p["blocks"])
  else:
    layer = lambda i: p[f"block_{i}"]
  state = {"model.embed_tokens.weight": p["embed"]["embedding"],
           "model.norm.weight": p["final_norm"]["scale"]}
  for i in range(cfg.num_layers):
    b, pre = layer(i), f"model.layers.{i}."
    attn, mlp = b["attn"], b["mlp"]
    for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
      state[pre + f"self_attn.{theirs}.weight"] = np.asarray(
          attn[ours]["kernel"]).reshape(width, -1).T  # [width, heads, hd] -> [heads*hd, width]
    state[pre + "self_attn.o_proj.weight"] = np.asarray(
        attn["out"]["kernel"]).reshape(-1, width).T  # [heads, hd, width] -> [width, heads*hd]
    for name in ("gate", "up", "down"):
      state[pre + f"mlp.{name}_proj.weight"] = np.asarray(mlp[name]["kernel"]).T
    state[pre + "input_layernorm.weight"] = b["attn_norm"]["scale"]
    state[pre + "post_attention_layernorm.weight"] = b["mlp_norm"]["scale"]
  own = model.state_dict()
  missing = [k for k in own if k not in state and k != "lm_head.weight"]
  if missing:
    raise RuntimeError(f"no decoder_jax weight for HF params {missing[:5]}...")
  with torch.no_grad():
    for k, v in state.items():
      if tuple(own[k].shape) != tuple(np.shape(v)):
        raise RuntimeError(f"{k}: HF shape {tuple(own[k].shape)} vs ours {np.shape(v)}")
      own[k].copy_(_to_torch(v, dtype, device))
  if cfg.tie_embeddings and model.lm_head.weight.data_ptr() != \
      model.model.embed_tokens.weight.data_ptr():
    raise RuntimeError("HF lm_head is not tied to the embedding")


class HfSide:

  def __init__(self, args, model, device, cache_implementation):
    self.args, self.model, self.device = args, model, device
    self.cache_implementation = cache_implementation
    self.name = "hf-static" if cache_implementation == "static" else "hf-dynamic"

  def _sync(self):
    import torch
    if self.device.type == "cuda":
      torch.cuda.synchronize()

  def _generate(self, prompts, new_tokens):
    import torch
    ids = torch.as_tensor(np.asarray(prompts), dtype=torch.long, device=self.device)
    mask = torch.ones_like(ids)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  pad_token_id=0)
    if self.cache_implementation is not None:
      kwargs["cache_implementation"] = self.cache_implementation
    self._sync()
    t0 = time.perf_counter()
    with torch.inference_mode():
      out = self.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    self._sync()
    return time.perf_counter() - t0, out[:, ids.shape[1]:].cpu().numpy()

  def prepare(self, prompts):
    return {}

  def run(self, prompts):
    return self._generate(prompts, self.args.new_tokens)

  def run_prefill(self, prompts):
    return self._generate(prompts, 1)[0]

  def logits(self, sequence):
    import torch
    ids = torch.as_tensor(np.asarray(sequence), dtype=torch.long, device=self.device)
    with torch.inference_mode():
      return self.model(input_ids=ids).logits.float().cpu().numpy()


# ---------------------------------------------------------------------------------------


def cross_check(jax_side, hf_side, prompt, jax_tokens, hf_tokens):
  """Greedy tokens of both sides for one row; where they differ, by how much the logits do."""
  jax_tokens, hf_tokens = np.asarray(jax_tokens), np.asarray(hf_tokens)
  same = jax_tokens == hf_tokens
  first_diff = None if same.all() else int(np.argmin(same))
  # Teacher-force the decoder_jax continuation through both models (no cache on either side).
  sequence = np.concatenate([prompt, jax_tokens[:-1]])[None]  # [1, P + N - 1]
  lj, lh = jax_side.logits(sequence)[0], hf_side.logits(sequence)[0]  # [T, vocab]
  p = len(prompt)
  lj, lh = lj[p - 1:], lh[p - 1:]  # logits that predict the generated tokens: [N, vocab]
  diff = np.abs(lj - lh)
  top2 = np.sort(lj, axis=-1)[:, -2:]
  margin = top2[:, 1] - top2[:, 0]  # decoder_jax's top-1 minus top-2 logit, per step
  report = {
      "tokens_match": bool(same.all()),
      "matching_tokens": int(same.sum()),
      "first_mismatch_step": first_diff,
      "max_abs_logit_diff": float(diff.max()),
      "mean_abs_logit_diff": float(diff.mean()),
      "logit_std": float(lj.std()),
      "teacher_forced_argmax_agree": int((lj.argmax(-1) == lh.argmax(-1)).sum()),
      "steps": int(len(jax_tokens)),
      "min_top1_margin": float(margin.min()),
  }
  if first_diff is not None:
    i = first_diff
    report["at_first_mismatch"] = {
        "jax_token": int(jax_tokens[i]), "hf_token": int(hf_tokens[i]),
        "jax_logits[jax_tok, hf_tok]": [float(lj[i, jax_tokens[i]]), float(lj[i, hf_tokens[i]])],
        "hf_logits[jax_tok, hf_tok]": [float(lh[i, jax_tokens[i]]), float(lh[i, hf_tokens[i]])],
        "max_abs_logit_diff_here": float(diff[i].max()),
    }
  return report


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--batches", default="1,8,64", help="comma-separated batch sizes")
  ap.add_argument("--new_tokens", type=int, default=256)
  ap.add_argument("--prompt_len", type=int, default=32)
  ap.add_argument("--repeats", type=int, default=3, help="timed runs per side and batch, after "
                  "one warm-up run; medians are quoted")
  ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                  help="compute, parameter and cache dtype of both sides (auto: float32 on "
                  "CPU, bfloat16 on an accelerator)")
  ap.add_argument("--matmul_dtype", default=None, choices=(None, "bfloat16"),
                  help="decoder_jax's model.matmul_dtype (bfloat16: projection operands "
                       "rounded, float32 sums; the HF side stays in --dtype)")
  ap.add_argument("--cache_block", type=int, default=None,
                  help="decoder_jax's generate_tokens cache_block (0: one full-length cache; "
                       "default: generate_tokens' own default)")
  ap.add_argument("--hf_dynamic", action="store_true", help="also time HF's default dynamic "
                  "cache")
  ap.add_argument("--skip_jax", action="store_true")
  ap.add_argument("--skip_hf", action="store_true")
  ap.add_argument("--no_prefill", action="store_true", help="do not time prefill apart")
  ap.add_argument("--no_cross_check", action="store_true")
  ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
  ap.add_argument("--seed", type=int, default=0, help="seed of the weights and prompts")
  ap.add_argument("--profile_dir", default=None, help="write a jax.profiler trace of one "
                  "decoder_jax run per batch here")
  ap.add_argument("--pretrained", default=None, metavar="SOURCE",
                  help="real weights for both sides and chat prompts (load_pretrained "
                       "source, e.g. fetch:smollm2-135m-instruct); default: random weights")
  ap.add_argument("--speculative", default="", help="comma-separated drafts: self:N (the "
                  "target's first N layers) or draft:SOURCE (load_pretrained); adds "
                  "speculative rows")
  ap.add_argument("--num_draft", default="4", help="comma-separated draft lengths k")
  ap.add_argument("--speculative_batches", default="1", help="batches of the speculative rows")
  ap.add_argument("--samples", default="16", help="comma-separated N of the shared-prefix "
                  "measurement (N=1 is added; empty: skip it)")
  ap.add_argument("--json_out", default=None)
  ap.add_argument("--report", nargs="+", default=None, metavar="JSON",
                  help="print one table from earlier --json_out files and exit (runs nothing)")
  args = ap.parse_args(argv)
  ints = lambda text: [int(x) for x in text.split(",") if x.strip()]  # noqa: E731
  args.batches = ints(args.batches)
  args.num_draft, args.speculative_batches = ints(args.num_draft), ints(args.speculative_batches)
  args.samples = sorted({1, *ints(args.samples)}) if ints(args.samples) else []
  try:
    args.speculative = features.parse_speculative(args.speculative)
  except ValueError as e:
    ap.error(str(e))
  if args.speculative and (args.skip_jax or not args.num_draft or min(args.num_draft) < 1):
    ap.error("--speculative needs the decoder_jax side and --num_draft >= 1")
  if args.new_tokens < 2 or args.prompt_len < 1 or args.repeats < 1 or not args.batches:
    ap.error("need --new_tokens >= 2, --prompt_len >= 1, --repeats >= 1, some --batches")
  return args


def report(paths):
  """One table from several --json_out files (e.g. batch 1 and batch 64 run apart)."""
  results, envs, checks, speculative, shared = [], [], {}, [], []
  for path in paths:
    with open(path) as f:
      data = json.load(f)
    envs.append(data["env"])
    results += data["results"]
    speculative += data.get("speculative", [])
    shared += data.get("shared_prefix", [])
    checks.update(data.get("checks", {}))
    a = data["args"]
    print(f"{path}: batches {a['batches']}, repeats {a['repeats']}, {data['env']['dtype']}, "
          f"jax {data['env']['jax']}, torch {data['env']['torch']}, transformers "
          f"{data['env']['transformers']}, {data['env']['cores']} cores")
  args = argparse.Namespace(**data["args"])
  args.repeats = "/".join(sorted({str(len(r["runs"])) for r in results}))
  print_table(results, args, envs[-1])
  print_features(results, speculative, shared, args)
  if checks:
    print("\nchecks: " + json.dumps(checks, indent=2))


def main(argv=None):
  args = parse_args(argv)
  if args.report:
    return report(args.report)
  import jax
  import flax.linen as nn
  import torch
  from decoder_jax.model import Decoder, preset

  num_cores = cores()
  backend = jax.default_backend()
  dtype = args.dtype if args.dtype != "auto" else ("float32" if backend == "cpu" else "bfloat16")
  torch_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  torch.set_num_threads(args.threads or num_cores)

  env = {
      "python": platform.python_version(), "platform": platform.platform(),
      "cpu": platform.processor() or platform.machine(), "cores": num_cores,
      "jax": version("jax"), "jaxlib": version("jaxlib"), "flax": version("flax"),
      "torch": torch.__version__, "transformers": version("transformers"),
      "jax_devices": [str(d) for d in jax.devices()], "jax_backend": backend,
      "torch_device": str(torch_device), "torch_threads": torch.get_num_threads(),
      "dtype": dtype, "matmul_dtype": args.matmul_dtype, "loadavg_start": os.getloadavg(),
      # PASSIVE: torch's OpenMP threads sleep instead of spinning when a core is taken.
      "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
  }
  env["weights"] = args.pretrained or "random"
  print("# decode benchmark: SmolLM2-135M architecture, "
        + (f"weights of {args.pretrained}" if args.pretrained else "random weights"))
  for k, v in env.items():
    print(f"  {k}: {v}")
  print(f"  prompt_len {args.prompt_len}, new_tokens {args.new_tokens}, greedy, no eos, "
        f"batches {args.batches}, repeats {args.repeats} (+1 warm-up)", flush=True)

  t0 = time.perf_counter()
  tokenizer = None
  if args.pretrained:
    from decoder_jax import load_pretrained
    trained = load_pretrained(args.pretrained, dtype=dtype)
    config = dataclasses.replace(trained.config, matmul_dtype=args.matmul_dtype)
    params, tokenizer = trained.params, trained.tokenizer
  else:
    config = preset(PRESET, dtype=dtype, param_dtype=dtype, matmul_dtype=args.matmul_dtype)
    params = jax.jit(lambda k: nn.unbox(Decoder(config).init(
        k, np.zeros((1, args.prompt_len), np.int32))["params"]))(jax.random.key(args.seed))
  params = jax.block_until_ready(params)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  print(f"  decoder_jax params: {n_params:,} ({time.perf_counter() - t0:.1f} s to "
        f"{'load' if args.pretrained else 'init'})")

  sides = []
  if not args.skip_jax:
    jside = JaxSide(args, config, params)
    env["jax_fn"] = jside.fn_name
    print(f"  decoder_jax function: {jside.fn_name}")
    sides.append(jside)
  if not args.skip_hf:
    from transformers import LlamaForCausalLM
    t0 = time.perf_counter()
    tdtype = getattr(torch, dtype)
    model = LlamaForCausalLM(hf_config(config)).to(device=torch_device, dtype=tdtype)
    model.eval()
    copy_params_into_hf(params, config, model)
    # No end-of-sequence token: HF neither stops at it nor (min_new_tokens) masks it, so
    # both sides decode the same raw greedy continuation.
    model.generation_config.eos_token_id = None
    env["hf_attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    print(f"  HF model: {sum(p.numel() for p in model.parameters()):,} params, "
          f"attention {env['hf_attn_implementation']}, weights copied from decoder_jax "
          f"({time.perf_counter() - t0:.1f} s)", flush=True)
    sides.append(HfSide(args, model, torch_device, "static"))
    if args.hf_dynamic:
      sides.append(HfSide(args, model, torch_device, None))

  rows = max(args.batches + (args.speculative_batches if args.speculative else []))
  if args.pretrained:
    all_prompts = features.chat_prompts(tokenizer, rows, args.prompt_len)
    print(f"  prompt of row 0: {tokenizer.decode(all_prompts[0].tolist())!r}")
  else:
    rs = np.random.RandomState(args.seed)  # row-major: row 0 is the same for any `rows`
    all_prompts = rs.randint(0, config.vocab_size, size=(rows, args.prompt_len),
                             dtype=np.int64).astype(np.int32)

  results, tokens, checks = [], {}, {}
  for batch in args.batches:
    prompts = all_prompts[:batch]
    print(f"\n## batch {batch}", flush=True)
    rec = {s.name: {"side": s.name, "batch": batch, "runs": [], "others_busy": []}
           for s in sides}
    for s in sides:  # compile + warm-up
      r = rec[s.name]
      r.update(s.prepare(prompts))
      with Contention() as c:
        r["first_call_s"], tokens[(s.name, batch)] = s.run(prompts)
      extra = "".join(f", {k} {r[k]:.2f} s" for k in ("trace_s", "compile_s") if k in r)
      print(f"  {s.name}: warm-up run {r['first_call_s']:.2f} s{extra}", flush=True)
    for rep in range(args.repeats):  # sides interleaved
      for s in sides:
        with Contention() as c:
          seconds, toks = s.run(prompts)
        rec[s.name]["runs"].append(seconds)
        rec[s.name]["others_busy"].append(c.others)
        if not np.array_equal(toks, tokens[(s.name, batch)]):
          print(f"  WARNING: {s.name} produced different tokens on repeat {rep}")
        print(f"  {s.name} repeat {rep}: {seconds:.3f} s "
              f"({seconds / args.new_tokens * 1e3:.2f} ms/step; others busy "
              f"{'?' if c.others is None else f'{c.others:.0%}'})", flush=True)
    if not args.no_prefill:
      for s in sides:
        s.run_prefill(prompts)  # compile / warm
        times = [s.run_prefill(prompts) for _ in range(args.repeats)]
        rec[s.name]["prefill_runs"] = times
        print(f"  {s.name} prefill: median {_median(times) * 1e3:.1f} ms", flush=True)
    if args.profile_dir and not args.skip_jax:
      jside = sides[0]
      path = os.path.join(args.profile_dir, f"batch{batch}")
      with jax.profiler.trace(path):
        seconds, _ = jside.run(prompts)
      print(f"  profile of one decoder_jax run ({seconds:.3f} s) in {path}", flush=True)
    for s in sides:
      r = rec[s.name]
      med = _median(r["runs"])
      r["total_s_median"] = med
      r["ms_per_step"] = med / args.new_tokens * 1e3
      r["ms_per_step_min"] = min(r["runs"]) / args.new_tokens * 1e3
      r["tok_per_s"] = batch * args.new_tokens / med
      if "prefill_runs" in r:
        r["prefill_s_median"] = _median(r["prefill_runs"])
        r["decode_only_ms_per_step"] = ((med - r["prefill_s_median"]) /
                                        (args.new_tokens - 1) * 1e3)
      results.append(r)
    # Token agreement between sides (same weights and prompts).
    if not args.skip_jax and not args.skip_hf:
      jt, ht = tokens[("decoder_jax", batch)], tokens[("hf-static", batch)]
      rows = int((jt == ht).all(axis=1).sum())
      checks[f"batch{batch}_rows_identical_jax_vs_hf_static"] = f"{rows}/{batch}"
      print(f"  greedy tokens identical (decoder_jax vs hf-static): {rows}/{batch} rows, "
            f"{float((jt == ht).mean()):.1%} of tokens", flush=True)

  if not args.no_cross_check and not args.skip_jax and not args.skip_hf:
    if dtype != "float32":
      print("\n(cross-check skipped: it is meaningful in float32 only; pass --dtype float32)")
    else:
      jside, hside = sides[0], sides[1]
      key = 1 if 1 in args.batches else None
      if key is None:  # no batch-1 timing: decode one row now
        jside.prepare(all_prompts[:1])
        tokens[("decoder_jax", 1)] = jside.run(all_prompts[:1])[1]
        tokens[("hf-static", 1)] = hside.run(all_prompts[:1])[1]
      cc = cross_check(jside, hside, all_prompts[0], tokens[("decoder_jax", 1)][0],
                       tokens[("hf-static", 1)][0])
      checks["batch1_float32"] = cc
      print("\n## cross-check, batch 1, float32, same weights")
      print(json.dumps(cc, indent=2))

  speculative = []
  if args.speculative:
    speculative = run_speculative(args, sides[0], config, params, tokenizer, dtype,
                                  all_prompts)
  shared = []
  if args.samples and not args.skip_jax:
    print(f"\n## shared prefixes: N in {args.samples}", flush=True)
    shared = features.measure_shared(params, config, all_prompts[0], args.samples,
                                     args.new_tokens, args.repeats, Contention)

  print_table(results, args, env)
  print_features(results, speculative, shared, args)
  if args.json_out:
    with open(args.json_out, "w") as f:
      json.dump({"env": env, "args": {k: v for k, v in vars(args).items()},
                 "results": results, "checks": checks, "speculative": speculative,
                 "shared_prefix": shared}, f, indent=2, default=str)
    print(f"\nwrote {args.json_out}")


def run_speculative(args, jside, config, params, tokenizer, dtype, all_prompts):
  """The speculative records of every --speculative draft x --num_draft and batch."""
  from decoder_jax import inference
  if not args.pretrained:
    print("\nWARNING: speculative decoding on random weights: acceptance is at chance; "
          "pass --pretrained for a meaningful figure")
  target = inference.TrainedModel(config, params, tokenizer)
  drafts = features.make_drafts(args.speculative, target, dtype)
  records = []
  for batch in args.speculative_batches:
    print(f"\n## speculative decoding, batch {batch}: drafts {[d for d, _ in drafts]}, "
          f"num_draft {args.num_draft}", flush=True)
    records += features.measure_speculative(jside, target, drafts, args.num_draft,
                                            all_prompts[:batch], args.repeats, Contention)
  return records


def print_features(results, speculative, shared, args):
  """The speculative and shared-prefix tables, then the summary of every row."""
  if speculative:
    features.print_speculative_table(speculative, args.repeats)
  if shared:
    features.print_shared_table(shared, args.prompt_len, args.repeats)
  if speculative or len(results) > 1:
    features.print_summary(results, speculative, args.new_tokens)


def _f(x, spec):
  return "-" if x is None else format(x, spec)


def _compile_cell(r):
  if r.get("compile_s") is None:
    return "-"
  return f"{r['trace_s']:.2f} + {r['compile_s']:.2f}"


def print_table(results, args, env):
  print(f"\n## results ({env['dtype']}, {env['jax_backend']} / torch {env['torch_device']}, "
        f"{env['cores']} cores, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
        f"median of {args.repeats})\n")
  print("| side | batch | ms/step (total/N) | new tok/s | ms/step best run | prefill ms "
        "| decode-only ms/step | first call s | trace + compile s | runs s | others busy |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for r in results:
    busy = [o for o in r["others_busy"] if o is not None]
    prefill = r.get("prefill_s_median")
    print(f"| {r['side']} | {r['batch']} | {r['ms_per_step']:.2f} | {r['tok_per_s']:,.1f} | "
          f"{r['ms_per_step_min']:.2f} | {_f(None if prefill is None else prefill * 1e3, '.1f')} | "
          f"{_f(r.get('decode_only_ms_per_step'), '.2f')} | {r['first_call_s']:.2f} | "
          f"{_compile_cell(r)} | "
          f"{', '.join(f'{x:.2f}' for x in r['runs'])} | "
          f"{', '.join(f'{o:.0%}' for o in busy) or '?'} |")
  by = {(r["side"], r["batch"]): r for r in results}
  lines = []
  for r in results:
    if r["side"] != "decoder_jax":
      continue
    for other in ("hf-static", "hf-dynamic"):
      o = by.get((other, r["batch"]))
      if o:
        lines.append(f"- batch {r['batch']}: decoder_jax / {other} ms per step = "
                     f"{r['ms_per_step'] / o['ms_per_step']:.2f}x (medians), "
                     f"{r['ms_per_step_min'] / o['ms_per_step_min']:.2f}x (best runs)")
  if lines:
    print("\n" + "\n".join(lines))
  print("\nms/step = median total generate seconds / new_tokens (prefill included); "
        "'best run' uses the fastest run instead (the robust figure when other processes "
        "share the cores: torch's OpenMP threads slow down sharply when oversubscribed); "
        "decode-only = (total - prefill) / (new_tokens - 1). decoder_jax 'trace + compile' is "
        "jit lowering + XLA compile of the one prefill + while_loop program, timed apart "
        "from the runs; "
        "'first call' is the warm-up run. 'others busy' = share of all cores used by other "
        "processes during each timed run.")


if __name__ == "__main__":
  sys.exit(main())
