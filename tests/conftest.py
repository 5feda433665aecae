"""Test setup: 8 forced CPU devices (set before jax is imported) and the shared corpora."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

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
