"""User errors through every command-line entry point: one `error:` line, exit 2 (1 for a
run that failed), no traceback, and nothing written to the workdir or the checkpoint.

Each case is a real subprocess. The cases are independent, so a module fixture runs them
two at a time, and one parametrized test checks each.
"""

import concurrent.futures
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

CPU_RECIPE = "--config=configs/shakespeare_char.py:cpu"
TINY_RUN = ["--config.model.num_layers=1", "--config.model.width=32", "--config.model.num_heads=2",
            "--config.train.num_steps=2", "--config.train.steps_per_call=1",
            "--config.train.log_every=1", "--config.train.eval_every=2",
            "--config.train.checkpoint_every=2", "--config.data.num_eval_windows=8",
            "--config.data.eval_batch_size=8", "--config.compilation_cache_dir="]


CLI_DEBUG = "DECODER_JAX_DEBUG"


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if k != CLI_DEBUG}
  return {**env, "PYTHONPATH": str(REPO), "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", **extra}


def _run(module, *args, env=None, cwd=None):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd or REPO,
                        env=env or _env(), capture_output=True, text=True, timeout=300)


def tree_digest(path) -> str:
  """A hash of every file's relative path and bytes under `path` ("" when absent)."""
  if not os.path.exists(path):
    return ""
  digest = hashlib.sha256()
  for root, dirs, files in sorted(os.walk(path)):
    dirs.sort()
    for name in sorted(files):
      full = os.path.join(root, name)
      digest.update(os.path.relpath(full, path).encode())
      with open(full, "rb") as f:
        digest.update(f.read())
  return digest.hexdigest()


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
  """Files the cases point at: a trained workdir (2 steps of a tiny model), an empty
  corpus folder, a plain file, a prompts file."""
  root = tmp_path_factory.mktemp("cli")
  trained = root / "trained"
  done = _run("decoder_jax.train", CPU_RECIPE, f"--workdir={trained}",
              f"--config.data.tfds_data_dir={root / 'tfds'}", *TINY_RUN)
  assert done.returncode == 0, done.stderr[-3000:]
  (root / "empty_corpus").mkdir()
  (root / "a_file").write_text("not a directory\n")
  (root / "prompts.txt").write_text("ROMEO:\nJULIET:\n")
  # A workdir whose checkpoint another model wrote: its model config says width 64.
  foreign = root / "foreign"
  shutil.copytree(trained, foreign)
  config = json.loads((foreign / "model_config.json").read_text())
  (foreign / "model_config.json").write_text(json.dumps({**config, "width": 64}))
  return root


def _cases(root):
  """name -> (module, args, expected exit status, expected text in the error line, the
  path that must be left as it was)."""
  tfds = f"--config.data.tfds_data_dir={root / 'tfds'}"
  trained, new = root / "trained", root / "new_workdir"
  gen = "decoder_jax.generate"
  return {
      "train: empty corpus": (
          "decoder_jax.train", [CPU_RECIPE, f"--workdir={new}", tfds,
                                f"--config.data.path={root / 'empty_corpus'}"],
          2, "contains no .txt files", new),
      "train: missing corpus": (
          "decoder_jax.train", [CPU_RECIPE, f"--workdir={new}", tfds,
                                f"--config.data.path={root / 'nowhere.txt'}"],
          2, "nowhere.txt does not exist", new),
      "train: unknown config field": (
          "decoder_jax.train", [CPU_RECIPE, f"--workdir={new}", "--config.model.widht=64"],
          2, 'Did you mean "width"', new),
      "train: missing config file": (
          "decoder_jax.train", ["--config=configs/no_such_config.py", f"--workdir={new}"],
          2, "no_such_config.py", new),
      "train: bad config value": (
          "decoder_jax.train", [CPU_RECIPE, f"--workdir={new}", tfds,
                                "--config.model.dropout=1.5"],
          2, "model.dropout must be in [0, 1)", new),
      "train: workdir is a file": (
          "decoder_jax.train", [CPU_RECIPE, f"--workdir={root / 'a_file'}"],
          2, "is not a directory", root / "a_file"),
      "train: checkpoint of another model": (
          "decoder_jax.train", [CPU_RECIPE, f"--workdir={trained}", tfds, *TINY_RUN,
                                "--config.model.width=64", "--config.train.num_steps=4"],
          2, "different shape", trained),
      "train: unsupported pretrained source": (
          "decoder_jax.train", [CPU_RECIPE, f"--workdir={new}", "--config.init_from=foo:bar"],
          2, "unknown kind 'foo'", new),
      "generate: top_p above 1": (
          gen, [f"--workdir={trained}", "--top_p=1.5"], 2, "top_p must be in (0, 1]", trained),
      "generate: negative temperature": (
          gen, [f"--workdir={trained}", "--temperature=-1"], 2, "temperature must be >= 0",
          trained),
      "generate: no beams": (
          gen, [f"--workdir={trained}", "--num_beams=0"], 2, "num_beams must be >= 1", trained),
      "generate: missing workdir": (
          gen, [f"--workdir={root / 'no_such_workdir'}"], 2, "does not exist",
          root / "no_such_workdir"),
      "generate: workdir is a file": (
          gen, [f"--workdir={root / 'a_file'}"], 2, "is not a directory", root / "a_file"),
      "generate: foreign checkpoint": (
          gen, [f"--workdir={root / 'foreign'}"], 2, "different shape", root / "foreign"),
      "generate: missing prompts file": (
          gen, [f"--workdir={trained}", f"--prompts_file={root / 'nope.txt'}"], 2,
          "nope.txt does not exist", trained),
      "generate: unsupported pretrained source": (
          gen, ["--pretrained=foo:bar"], 2, "unknown kind 'foo'", trained),
      "evaluate: workdir without a run": (
          "decoder_jax.evaluate", ["--config=configs/smollm2_sst2.py:lora",
                                   f"--workdir={root / 'empty_corpus'}"],
          2, "holds no training run", root / "empty_corpus"),
      "convert: unsupported source": (
          "decoder_jax.convert", ["--source=foo:bar", f"--output={new}"], 2,
          "unknown kind 'foo'", new),
      "convert: a training workdir": (
          "decoder_jax.convert", [f"--source={trained}", f"--output={new}"], 2,
          "is a training workdir", new),
      "train_sentencepiece: missing input": (
          "decoder_jax.data.train_sentencepiece", [f"--input={root / 'nowhere'}",
                                                   f"--model_prefix={new}/spm"],
          2, "does not exist", new),
      "trace_account: no trace": (
          "decoder_jax.trace_account", [str(root / "empty_corpus"), "--steps=3"], 2,
          "no *.xplane.pb", root / "empty_corpus"),
      # A download that cannot reach the package index is a failed run: exit 1.
      "generate: download fails": (
          gen, ["--pretrained=fetch:smollm2-135m-instruct"], 1, "could not download", new),
  }


@pytest.fixture(scope="module")
def outcomes(scene):
  cases = _cases(scene)
  before = {name: tree_digest(case[4]) for name, case in cases.items()}
  # The download case: an empty cache and an index that refuses connections.
  (scene / "no_wheels").mkdir()
  offline = _env(DECODER_JAX_CACHE=str(scene / "empty_cache"), PIP_CONFIG_FILE=os.devnull,
                 PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_EXTRA_INDEX_URL="",
                 PIP_FIND_LINKS=str(scene / "no_wheels"), PIP_RETRIES="0",
                 PIP_DEFAULT_TIMEOUT="5")
  envs = {"generate: download fails": offline}
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    futures = {name: pool.submit(_run, module, *args, env=envs.get(name))
               for name, (module, args, *_) in cases.items()}
    done = {name: future.result() for name, future in futures.items()}
  return cases, before, done


CASE_NAMES = list(_cases(REPO).keys())


@pytest.mark.parametrize("name", CASE_NAMES)
def test_user_error_is_one_line_and_touches_nothing(outcomes, name):
  cases, before, done = outcomes
  _, _, status, expected, untouched = cases[name]
  result = done[name]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, result.stderr[-3000:]
  assert result.stderr.rstrip().splitlines()[-1] == errors[0]  # the last thing printed
  assert expected in errors[0], errors[0]
  assert result.returncode == status, (result.returncode, errors[0])
  assert tree_digest(untouched) == before[name], f"{untouched} changed"


def test_debug_shows_the_traceback(scene):
  for extra, env in (([], _env(**{CLI_DEBUG: "1"})), (["--debug"], None)):
    done = _run("decoder_jax.generate", f"--workdir={scene / 'trained'}", "--top_p=1.5", *extra,
                env=env)
    assert done.returncode != 0
    assert "Traceback" in done.stderr and "top_p must be in (0, 1]" in done.stderr


def test_a_bug_keeps_its_traceback(tmp_path):
  """A programming error is not a user error: the wrapper leaves it alone."""
  script = tmp_path / "buggy.py"
  script.write_text("from decoder_jax import cli\n"
                    "def main(argv):\n  return {}['missing']\n"
                    "cli.run(main)\n")
  done = subprocess.run([sys.executable, str(script)], env=_env(), capture_output=True,
                        text=True, timeout=120)
  assert done.returncode == 1
  assert "Traceback" in done.stderr and "KeyError: 'missing'" in done.stderr
  assert not any(line.startswith("error:") for line in done.stderr.splitlines())
