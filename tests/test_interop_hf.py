"""Hugging Face interop: tiny random transformers models imported, run, exported, reloaded.

Each architecture is built with transformers itself, so layouts are checked against the
real thing: our logits must match transformers' before and after a round trip.
"""

import json
import os
import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")
tokenizers = pytest.importorskip("tokenizers")

from decoder_jax.data import tokenizers as our_tokenizers  # noqa: E402
from decoder_jax.interop import hf  # noqa: E402
from decoder_jax.interop.hf_tokenizer import HFTokenizer  # noqa: E402
from decoder_jax.model import Decoder  # noqa: E402
from decoder_jax import sharding  # noqa: E402

VOCAB = 96
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=64)
ARCHITECTURES = {
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
        eos_token_id=0)),
    # SmolLM2-like: GQA with tied embeddings.
    "llama_gqa_tied": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **SMALL, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=500.0)),
    "llama_biases": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **SMALL, num_key_value_heads=1, attention_bias=True, mlp_bias=True)),
    # q/k/v biases only, untied head.
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        **SMALL, num_key_value_heads=2, tie_word_embeddings=False)),
    "mistral": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(
        **SMALL, num_key_value_heads=2, sliding_window=None)),
}
EXPORTED_AS = {"mistral": transformers.LlamaForCausalLM}  # same layout and function
TOKENS = np.random.RandomState(0).randint(0, VOCAB, (2, 11))


def random_hf_model(name, seed=0):
  """A transformers model with every parameter random (HF initialises biases to zero,
  which would hide a misplaced bias)."""
  torch.manual_seed(seed)
  model = ARCHITECTURES[name]()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def hf_logits(model):
  with torch.no_grad():
    return model(torch.tensor(TOKENS)).logits.float().numpy()


def our_logits(config, params, tokens=TOKENS):
  apply = jax.jit(Decoder(config).apply)  # one compile, not one per op
  return np.asarray(apply({"params": params}, tokens)[0], np.float32)


def reload_with_transformers(directory):
  model, info = transformers.AutoModelForCausalLM.from_pretrained(
      directory, output_loading_info=True)
  assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  return model.eval()


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
  path = tmp_path_factory.mktemp("llama")
  model = random_hf_model("llama_gqa_tied")
  model.save_pretrained(path)
  return path, hf_logits(model)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_import_export_round_trip(name, tmp_path):
  model = random_hf_model(name)
  model.save_pretrained(tmp_path / "hf")
  expected = hf_logits(model)

  config, params = hf.load_hf(tmp_path / "hf")
  np.testing.assert_allclose(our_logits(config, params), expected, atol=1e-4, rtol=0)

  hf.save_hf(tmp_path / "export", config, params)
  reloaded = reload_with_transformers(tmp_path / "export")
  assert type(reloaded) is EXPORTED_AS.get(name, type(model))
  np.testing.assert_allclose(hf_logits(reloaded), expected, atol=1e-4, rtol=0)


def test_sharded_checkpoint_lands_with_rule_shardings(saved_llama, tmp_path):
  path, expected = saved_llama
  model = transformers.AutoModelForCausalLM.from_pretrained(path)
  model.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
  assert (tmp_path / "sharded" / hf.INDEX_FILE).exists()
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})  # the 8 forced CPU devices

  config, params = hf.load_hf(tmp_path / "sharded", mesh=mesh)

  wanted = sharding.shardings_for(hf.abstract_params(config), mesh)
  for leaf, want in zip(jax.tree.leaves(params), jax.tree.leaves(wanted)):
    assert leaf.sharding == want
  query = params["block_0"]["attn"]["query"]["kernel"]  # [embed, heads, kv]: fsdp, tensor
  assert query.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
  np.testing.assert_allclose(our_logits(config, params), expected, atol=1e-4, rtol=0)

  # Our own sharded export, read back by both sides.
  hf.save_hf(tmp_path / "ours", config, params, max_shard_bytes=40_000)
  assert len([f for f in os.listdir(tmp_path / "ours") if f.endswith(".safetensors")]) > 1
  np.testing.assert_allclose(hf_logits(reload_with_transformers(tmp_path / "ours")), expected,
                             atol=1e-4, rtol=0)
  _, again = hf.load_hf(tmp_path / "ours")
  jax.tree.map(np.testing.assert_array_equal, again, jax.device_get(params))


def test_gpt2_original_layout(tmp_path):
  """OpenAI's GPT-2 checkpoints on the Hub: no "transformer." prefix, mask buffers saved."""
  random_hf_model("gpt2").save_pretrained(tmp_path)
  _, expected = hf.load_hf(tmp_path)

  def original_layout(tensors):
    for name in list(tensors):
      tensors[name.removeprefix("transformer.")] = tensors.pop(name)
    tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))

  rewrite_tensors(tmp_path, original_layout)
  _, params = hf.load_hf(tmp_path)
  jax.tree.map(np.testing.assert_array_equal, params, expected)


def test_bfloat16_checkpoint_and_scanned_layers(saved_llama, tmp_path):
  path, expected = saved_llama
  model = transformers.AutoModelForCausalLM.from_pretrained(path)
  model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")

  config, params = hf.load_hf(tmp_path / "bf16")
  assert config.param_dtype == "bfloat16"
  assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves(params))

  config, params = hf.load_hf(tmp_path / "bf16", dtype="float32",
                              config_overrides={"scan_layers": True})
  assert params["blocks"]["attn"]["query"]["kernel"].shape == (2, 64, 4, 16)  # [layers, ...]
  np.testing.assert_allclose(our_logits(config, params), expected, atol=0.05, rtol=0)
  hf.save_hf(tmp_path / "export", config, params, dtype="bfloat16")
  reloaded = reload_with_transformers(tmp_path / "export")
  assert reloaded.dtype == torch.bfloat16


def test_export_without_biases_writes_zeros(tmp_path):
  """A bias-free GPT-2 (as our shakespeare configs) exports as a GPT-2 with zero biases."""
  from decoder_jax.model import ModelConfig
  config = ModelConfig(family="gpt2", vocab_size=VOCAB, num_layers=2, num_heads=4, width=32,
                       max_length=16, use_bias=False)
  tokens = TOKENS[:, :8]
  rng = np.random.RandomState(0)  # random values without compiling the initialisers
  params = jax.tree.map(lambda x: rng.normal(0, 0.1, x.shape).astype(np.float32),
                        nn.unbox(hf.abstract_params(config)))
  hf.save_hf(tmp_path, config, params)
  reloaded = reload_with_transformers(tmp_path)
  with torch.no_grad():
    theirs = reloaded(torch.tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(our_logits(config, params, tokens), theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("changes, message", [
    (dict(model_type="bert"), r"unsupported .* 'bert'; supported: gpt2, llama, mistral, qwen2"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4}), "rope scaling 'llama3'"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    (dict(model_type="mistral", sliding_window=16), "sliding_window 16 shorter"),
    (dict(model_type="qwen2", use_sliding_window=True), "use_sliding_window"),
    (dict(head_dim=32), "head_dim 32"),
])
def test_unsupported_configs_are_clear_errors(saved_llama, changes, message):
  hf_config = json.loads((saved_llama[0] / "config.json").read_text())
  with pytest.raises(ValueError, match=message):
    hf.config_from_hf({**hf_config, **changes})


def rewrite_tensors(directory, edit):
  path = directory / hf.WEIGHTS_FILE
  from safetensors import safe_open
  with safe_open(path, framework="numpy") as f:
    tensors = {name: f.get_tensor(name) for name in f.keys()}
  edit(tensors)
  safetensors_numpy.save_file(tensors, path, metadata={"format": "pt"})


def test_wrong_shape_names_the_tensor_and_both_shapes(saved_llama, tmp_path):
  directory = tmp_path / "bad"
  shutil.copytree(saved_llama[0], directory)
  name = "model.layers.1.self_attn.k_proj.weight"  # [kv_heads * head_dim, width] = [32, 64]
  rewrite_tensors(directory, lambda t: t.update({name: np.zeros((16, 64), np.float32)}))
  with pytest.raises(ValueError, match=rf"'{name}' has shape \(16, 64\).*\(32, 64\)"):
    hf.load_hf(directory)


def test_missing_and_unexpected_tensors(saved_llama, tmp_path):
  directory = tmp_path / "bad"
  shutil.copytree(saved_llama[0], directory)
  rewrite_tensors(directory, lambda t: t.pop("model.norm.weight"))
  with pytest.raises(ValueError, match="lacks 1 tensor.*model.norm.weight"):
    hf.load_hf(directory)
  rewrite_tensors(directory, lambda t: t.update({"model.norm.weight": np.ones(64, np.float32),
                                                 "model.extra.weight": np.ones(3, np.float32)}))
  with pytest.raises(ValueError, match="model.extra.weight"):
    hf.load_hf(directory)
  with pytest.warns(UserWarning, match="model.extra.weight"):
    hf.load_hf(directory, strict=False)


def test_missing_files_are_named(saved_llama, tmp_path):
  model = transformers.AutoModelForCausalLM.from_pretrained(saved_llama[0])
  model.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
  shard = sorted(f for f in os.listdir(tmp_path / "sharded") if f.endswith(".safetensors"))[1]
  os.remove(tmp_path / "sharded" / shard)
  with pytest.raises(FileNotFoundError, match=shard):
    hf.load_hf(tmp_path / "sharded")
  os.makedirs(tmp_path / "empty")
  shutil.copy(saved_llama[0] / "config.json", tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    hf.load_hf(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match="config.json"):
    hf.load_hf(tmp_path)


# ----------------------------------------------------------------------------- tokenizer

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] | trim }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "  What is the capital of France? "},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And of Italy?"}]
TEXT = "the quick brown fox jumps over the lazy dog; the dog sleeps, the fox runs.\n" * 4


@pytest.fixture(scope="module")
def hf_tokenizer_dir(tmp_path_factory):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  directory = tmp_path_factory.mktemp("tokenizer")
  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  special = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=special,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tokenizer.train_from_iterator([TEXT], trainer)
  tokenizer.save(str(directory / "tokenizer.json"))
  (directory / "tokenizer_config.json").write_text(json.dumps(dict(
      bos_token="<s>", eos_token="<|im_end|>", chat_template=CHAT_TEMPLATE,
      tokenizer_class="PreTrainedTokenizerFast")))
  (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 1]}))
  return directory


def test_tokenizer_matches_transformers(hf_tokenizer_dir):
  ours = HFTokenizer.load(hf_tokenizer_dir)
  theirs = transformers.PreTrainedTokenizerFast.from_pretrained(hf_tokenizer_dir)
  text = "the lazy fox sleeps; a new Word, ünïcode!"
  assert ours.encode(text) == theirs.encode(text)
  assert ours.decode(ours.encode(text)) == text
  assert ours.vocab_size == len(theirs)
  assert (ours.bos_id, ours.eos_id, ours.eos_ids) == (theirs.bos_token_id, theirs.eos_token_id,
                                                        [3, 1])
  for add_generation_prompt in (True, False):
    rendered = ours.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt)
    assert rendered == theirs.apply_chat_template(
        MESSAGES, add_generation_prompt=add_generation_prompt, tokenize=False)
  assert rendered.startswith("<s><|im_start|>system\nYou are terse.<|im_end|>\n")
  with pytest.raises(ValueError, match="unknown role tool"):
    ours.apply_chat_template([{"role": "tool", "content": "x"}])


def test_tokenizer_saves_and_loads_through_data_tokenizers(hf_tokenizer_dir, tmp_path):
  direct = our_tokenizers.load_tokenizer(hf_tokenizer_dir)  # a HF directory as it is
  assert isinstance(direct, HFTokenizer)
  our_tokenizers.save_tokenizer(direct, tmp_path)
  loaded = our_tokenizers.load_tokenizer(tmp_path)
  assert isinstance(loaded, HFTokenizer)
  assert loaded.encode(TEXT) == direct.encode(TEXT)
  assert (loaded.bos_id, loaded.eos_ids) == (direct.bos_id, direct.eos_ids)
  assert loaded.apply_chat_template(MESSAGES) == direct.apply_chat_template(MESSAGES)
