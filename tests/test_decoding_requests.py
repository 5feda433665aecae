"""Decoding requests as a user sends them: batches past the context, stop strings, shared
prefixes for several samples, streaming, and one beam against greedy."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoder_jax import decoding, inference, pretrained
from decoder_jax.data.tokenizers import CharTokenizer
from decoder_jax.model import Decoder, ModelConfig

ALPHABET = "abcdefghijklmnopqrstuvwxyz .\n"
# init_std 0.3: at the default 0.02 a random model's greedy output repeats one token.
CONFIGS = {
    "llama": ModelConfig(family="llama", vocab_size=len(ALPHABET), num_layers=2, num_heads=4,
                         num_kv_heads=2, width=32, max_length=32, use_bias=False,
                         init_std=0.3),
    "gpt2_scan": ModelConfig(family="gpt2", vocab_size=len(ALPHABET), num_layers=2,
                             num_heads=2, width=32, max_length=32, scan_layers=True,
                             init_std=0.3),
}
# Six prompts, three of them longer than the context (32) minus max_new_tokens (24).
PROMPTS = ["the cat sat on the mat", "a", "hello there my friend how are you today",
           "xy", "what a long and winding road this is to walk upon", "no"]


def make_model(name, seed=0):
  config = CONFIGS[name]
  params = nn.unbox(Decoder(config).init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))
                    ["params"])
  return inference.TrainedModel(config, params, CharTokenizer.from_text(ALPHABET))


@pytest.fixture(scope="module")
def trained():
  return make_model("llama")


@pytest.mark.parametrize("name, sampler", [("llama", decoding.Greedy()),
                                           ("llama", decoding.TopK(6, 1.2)),
                                           ("gpt2_scan", decoding.TopK(6, 1.2))])
def test_a_ragged_batch_past_the_context_decodes_each_prompt_as_alone(name, sampler):
  trained = make_model(name)
  batch = inference.generate_batch(trained, PROMPTS, max_new_tokens=24, sampler=sampler,
                                   seed=4)
  for prompt, result in zip(PROMPTS, batch):
    alone = inference.generate_batch(trained, [prompt], max_new_tokens=24, sampler=sampler,
                                     seed=4)[0]["samples"][0]
    assert result["samples"][0]["tokens"] == alone["tokens"], prompt
    assert len(alone["tokens"]) == 24  # no eos in this vocabulary: every row runs full
  assert batch[2]["samples"][0]["text"] == inference.complete(
      trained, PROMPTS[2], max_new_tokens=24, sampler=sampler, seed=4)


def test_windows_follow_the_documented_rule(trained):
  """Past the context, the next window is the last half of the window and its output:
  greedy tokens equal a window-by-window reference built from full forward passes."""
  config, model = trained.config, Decoder(trained.config)
  # One fixed-width buffer (one compile); causality makes the padding after a window
  # irrelevant to the logits at its last token.
  forward = jax.jit(lambda t: model.apply({"params": trained.params}, t)[0])
  prompt = inference.encode_prompt(trained.tokenizer, PROMPTS[2])  # 39 tokens > context
  keep, expected = config.max_length // 2, []
  window = prompt[-keep:]
  while len(expected) < 40:
    buffer = np.zeros((1, config.max_length), np.int32)
    buffer[0, :len(window)] = window
    logits = forward(jnp.asarray(buffer))
    token = int(jnp.argmax(logits[0, len(window) - 1]))
    expected.append(token)
    window = window + [token]
    if len(window) == config.max_length:
      window = window[-keep:]
  out = inference.generate_batch(trained, [PROMPTS[2]], max_new_tokens=40)[0]["samples"][0]
  assert out["tokens"] == expected


def test_one_program_per_prompt_bucket_however_long_the_prompts():
  config = dataclasses.replace(CONFIGS["llama"], num_layers=1)  # programs no test compiled
  params = nn.unbox(Decoder(config).init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))
                    ["params"])
  trained = inference.TrainedModel(config, params, CharTokenizer.from_text(ALPHABET))
  before = inference.generate_tokens._cache_size()
  for prompts in (PROMPTS, list(reversed(PROMPTS)), PROMPTS[:3] + ["abc"] * 3):
    inference.generate_batch(trained, prompts, max_new_tokens=24)
  # The first windows pad to the context less one (the longest prompt is past it); every
  # later window is the 16-token half: two programs, whatever the batch.
  assert inference.generate_tokens._cache_size() - before == 2


def test_one_beam_equals_greedy(trained):
  short = [p for p in PROMPTS if len(p) <= 8]
  beams = inference.generate_batch(trained, short, max_new_tokens=10, num_beams=1)
  greedy = inference.generate_batch(trained, short, max_new_tokens=10)
  assert [b["samples"][0]["tokens"] for b in beams] == [g["samples"][0]["tokens"] for g in greedy]
  ids = [inference.encode_prompt(trained.tokenizer, p) for p in short]
  array, lengths = inference.pad_prompts(ids)
  searched = inference.beam_search_tokens(trained.params, array, lengths,
                                          model_config=trained.config, num_beams=1,
                                          max_new_tokens=10)
  for row, g in enumerate(greedy):
    assert np.asarray(searched.tokens[row, 0]).tolist() == g["samples"][0]["tokens"]


def test_beam_search_keeps_a_long_prompts_last_tokens(trained):
  prompt = PROMPTS[4]
  ids = inference.encode_prompt(trained.tokenizer, prompt)
  room = trained.config.max_length - 8
  long = inference.generate_batch(trained, [prompt], max_new_tokens=8, num_beams=3)[0]
  tail = trained.tokenizer.decode(ids[-room:])
  cropped = inference.generate_batch(trained, [tail], max_new_tokens=8, num_beams=3)[0]
  assert [s["tokens"] for s in long["samples"]] == [s["tokens"] for s in cropped["samples"]]


def test_samples_share_one_prefill_and_each_draws_as_alone(trained):
  sampler = decoding.Temperature(1.0)
  together = inference.generate_batch(trained, ["the cat", "dog"], max_new_tokens=12,
                                      sampler=sampler, seed=9, num_samples=4)
  assert len({tuple(s["tokens"]) for s in together[0]["samples"]}) > 1  # they differ
  # Sample j draws with sample_keys(seed, 4)[j], whatever else is in the batch: sample 0
  # is the prompt alone with the same seed.
  alone = inference.generate_batch(trained, ["the cat"], max_new_tokens=12, sampler=sampler,
                                   seed=9)[0]["samples"][0]
  assert together[0]["samples"][0]["tokens"] == alone["tokens"]
  # Without sharing: the prompt repeated four times through decoding.generate, one row
  # per sample key; the shared prefill gives the same tokens.
  ids = inference.encode_prompt(trained.tokenizer, "the cat")
  array, lengths = inference.pad_prompts([ids] * 4)
  keys = jnp.stack([jax.random.key_data(k) for k in inference.sample_keys(9, 4)])
  keys = jax.vmap(jax.random.split)(jax.random.wrap_key_data(keys))[:, 1]
  repeated = inference.generate_tokens(trained.params, array, lengths, keys,
                                       model_config=trained.config, max_new_tokens=12,
                                       sampler=sampler)
  assert [s["tokens"] for s in together[0]["samples"]] == np.asarray(repeated.tokens).tolist()


def test_streamed_tokens_arrive_in_order_and_equal_the_result(trained):
  got = {0: [], 1: [], 2: []}
  prompts = ["the cat", PROMPTS[4], "x"]
  result = inference.generate_batch(trained, prompts, max_new_tokens=20,
                                    sampler=decoding.TopK(5), seed=2,
                                    on_token=lambda i, token: got[i].append(token))
  for i, r in enumerate(result):
    assert got[i] == r["samples"][0]["tokens"]
  with pytest.raises(ValueError, match="one sample per prompt"):
    inference.generate_batch(trained, prompts, max_new_tokens=4, num_samples=2,
                             on_token=lambda i, t: None)


# Stop strings, on the real SmolLM2 tokenizer (byte-level BPE: strings start and end in
# the middle of tokens).


@pytest.fixture(scope="module")
def smol(tiny_pretrained):
  return pretrained.load_pretrained(str(tiny_pretrained))


def free_text(smol, prompt, n=40):
  return inference.generate_batch(smol, [prompt], max_new_tokens=n, sampler=decoding.TopK(50),
                                  seed=1)[0]["samples"][0]


def test_stop_strings_spanning_and_splitting_tokens_cut_the_text(smol):
  free = free_text(smol, "Once upon a time")
  tokenizer, ids = smol.tokenizer, free["tokens"]
  pieces = [tokenizer.decode([t]) for t in ids]
  # A stop string starting in the middle of token 10 and ending inside token 12.
  start = len(tokenizer.decode(ids[:10])) + max(1, len(pieces[10]) // 2)
  end = len(tokenizer.decode(ids[:12])) + max(1, len(pieces[12]) // 2)
  text = tokenizer.decode(ids)
  stop = text[start:end]
  assert len(tokenizer.encode(stop)) > 1
  out = inference.generate_batch(smol, ["Once upon a time"], max_new_tokens=40,
                                 sampler=decoding.TopK(50), seed=1,
                                 stop=(stop, "never in this text \u2603"))[0]["samples"][0]
  first = text.index(stop)
  assert out["text"] == text[:first]
  assert out["finish_reason"] == "stop"
  # The row stopped on the token that completes the string: the first tokens whose text
  # holds it.
  completes = next(n for n in range(1, len(ids) + 1) if stop in tokenizer.decode(ids[:n]))
  assert out["tokens"] == ids[:completes]


def test_min_new_tokens_lets_a_stop_string_pass_before_it(smol):
  free = free_text(smol, "The weather")
  tokenizer, ids = smol.tokenizer, free["tokens"]
  stop = tokenizer.decode(ids[2:4])  # whole tokens 2..3
  out = inference.generate_batch(smol, ["The weather"], max_new_tokens=40,
                                 sampler=decoding.TopK(50), seed=1, stop=(stop,),
                                 min_new_tokens=5)[0]["samples"][0]
  head = tokenizer.decode(ids[:5])
  rest = tokenizer.decode(ids[5:])
  if stop in rest:
    assert out["text"] == head + rest[:rest.index(stop)]
    assert out["finish_reason"] == "stop"
  else:
    assert out["tokens"] == ids and out["finish_reason"] == "length"


def test_stop_strings_through_the_generate_command(smol, tiny_pretrained, tmp_path):
  import subprocess
  import sys

  free = free_text(smol, "Hello", n=16)
  text = smol.tokenizer.decode(free["tokens"])
  stop = text[5:9]
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("Hello\n")
  escaped = stop.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")
  run = subprocess.run(
      [sys.executable, "-m", "decoder_jax.generate", f"--pretrained={tiny_pretrained}",
       f"--prompts_file={prompts}", "--max_new_tokens=16", "--temperature=1", "--top_k=50",
       "--seed=1", f"--stop={escaped}", f"--output={tmp_path / 'out.jsonl'}"],
      capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-2000:]
  import json
  row = json.loads((tmp_path / "out.jsonl").read_text().splitlines()[0])
  assert row["text"] == text[:text.index(stop)] and row["finish_reason"] == "stop"


def test_prompts_file_equals_each_prompt_alone_through_the_command(smol, tiny_pretrained,
                                                                   tmp_path):
  """The issue's check: six prompts, some longer than the context (256) less
  max_new_tokens, decoded with --prompts_file (sampling at the default temperature) and
  each alone with --prompt give the same text."""
  import json
  import subprocess
  import sys

  words = "the quick brown fox jumps over the lazy dog while the river runs".split()
  long_prompt = lambda n, s: " ".join(words[(i * s) % len(words)] for i in range(n))  # noqa: E731
  prompts = ["Hello", long_prompt(240, 3), "A", long_prompt(300, 5), "Once upon a time",
             long_prompt(200, 7)]
  lengths = [len(smol.tokenizer.encode(p)) for p in prompts]
  assert sum(n + 24 > smol.config.max_length for n in lengths) >= 2, lengths
  file = tmp_path / "prompts.txt"
  file.write_text("\n".join(prompts) + "\n")

  def run(*flags):
    out = tmp_path / f"out{len(list(tmp_path.iterdir()))}.jsonl"
    done = subprocess.run([sys.executable, "-m", "decoder_jax.generate",
                           f"--pretrained={tiny_pretrained}", "--max_new_tokens=24",
                           "--seed=3", f"--output={out}", *flags],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return [json.loads(line) for line in out.read_text().splitlines()]

  batch = run(f"--prompts_file={file}")
  for i in (1, 3):  # the two past the context (a short one: the library tests above)
    alone = run(f"--prompt={prompts[i]}")[0]
    assert alone["text"] == batch[i]["text"] and alone["tokens"] == batch[i]["tokens"], i
