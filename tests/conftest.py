"""Test setup: 8 forced CPU devices (set before jax is imported) and the shared corpora."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# No persistent compilation cache (the launchers' default is ~/.cache): every test compiles
# what it runs, and compile-counting tests count real compiles. test_train turns it on
# for the cache's own test.
os.environ["JAX_COMPILATION_CACHE_DIR"] = ""

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


def shared_data_dir() -> pathlib.Path:
  """DECODER_JAX_DATA if set, else ../shared/data next to the repository."""
  env = os.environ.get("DECODER_JAX_DATA")
  return pathlib.Path(env) if env else REPO.parent / "shared" / "data"


def require_corpora() -> pathlib.Path:
  """The corpora folder. Missing, the test fails (so a misconfigured CI cannot pass by
  skipping) unless DECODER_JAX_SKIP_DATA_TESTS=1 asks for a skip."""
  path = shared_data_dir()
  if not (path / "tiny_shakespeare" / "input.txt").exists():
    message = (f"corpora not found at {path}: set DECODER_JAX_DATA to a folder holding "
               "tiny_shakespeare/input.txt (or DECODER_JAX_SKIP_DATA_TESTS=1 to skip)")
    if os.environ.get("DECODER_JAX_SKIP_DATA_TESTS") == "1":
      pytest.skip(message)
    pytest.fail(message)
  return path


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
  return require_corpora()


# A tiny Llama with SmolLM2's vocabulary: stands in for the pretrained model in tests.
TINY_SMOL = dict(family="llama", vocab_size=49152, num_layers=2, num_heads=4, num_kv_heads=2,
                 width=32, max_length=256, use_bias=False, tie_embeddings=True)


@pytest.fixture(scope="session")
def smol_tokenizer():
  from decoder_jax.interop import fetch, gguf
  return gguf.tokenizer_from_gguf(fetch.smollm2_gguf_path())  # metadata only, no weights


@pytest.fixture(scope="session")
def tiny_pretrained(tmp_path_factory, smol_tokenizer):
  """A directory in `python -m decoder_jax.convert`'s layout: a random tiny Llama with the
  SmolLM2 tokenizer, standing in for a pretrained checkpoint."""
  import json

  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import orbax.checkpoint as ocp

  from decoder_jax import pretrained
  from decoder_jax.data import tokenizers
  from decoder_jax.model import Decoder, ModelConfig
  from decoder_jax.train import loop

  directory = tmp_path_factory.mktemp("pretrained")
  config = ModelConfig(**TINY_SMOL)
  params = Decoder(config).init(jax.random.key(7), jnp.zeros((1, 8), jnp.int32))["params"]
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(str(directory / pretrained.PARAMS_DIR), nn.unbox(params))
  with open(directory / loop.MODEL_CONFIG_FILE, "w") as f:
    json.dump(config.to_dict(), f)
  tokenizers.save_tokenizer(smol_tokenizer, directory)
  return directory
