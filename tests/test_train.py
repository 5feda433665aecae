"""Training end to end on tiny shakespeare: sharding, resume, signals, sampling, errors."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import REPO
from decoder_jax import decoding, inference, trace_account
from decoder_jax.model import Decoder, ModelConfig
from decoder_jax import losses, sharding, workdir as workdir_lib
from decoder_jax.train import feeding, loop, optimizer, state as state_lib

CONFIG = str(REPO / "configs" / "shakespeare_char.py")
# A tiny GPT on characters: a few seconds per run on 2 cores.
TINY = dict(num_layers=2, num_heads=2, width=32, max_length=32)


def tiny_config(data_dir, tmp_path, **train):
  sys.path.insert(0, str(REPO))
  from configs import shakespeare_char
  config = shakespeare_char.get_config("cpu")
  config.model.update(TINY)
  config.train.update({**dict(num_steps=6, batch_size=8, log_every=1, eval_every=3,
                              checkpoint_every=3, warmup_steps=2, steps_per_call=1), **train})
  config.data.local_dir = str(data_dir)
  config.data.num_eval_windows = 64
  config.data.eval_batch_size = 32
  config.data.tfds_data_dir = str(tmp_path / "tfds")
  return config


def read_metrics(workdir, key):
  """{step: value} of `key` in metrics.jsonl; each step must appear at most once."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  steps = [r["step"] for r in rows if key in r]
  assert len(steps) == len(set(steps)), f"duplicate steps for {key}: {steps}"
  return {r["step"]: r[key] for r in rows if key in r}


def run_cli(workdir, data_dir, tmp_path, *overrides, check=True, env_update=None, **popen):
  """Runs the train CLI on the tiny CPU recipe; env_update: variables to set (None: unset)."""
  args = [sys.executable, "-m", "decoder_jax.train", f"--config={CONFIG}:cpu",
          f"--workdir={workdir}", f"--config.data.local_dir={data_dir}",
          f"--config.data.tfds_data_dir={tmp_path / 'tfds'}",
          "--config.data.num_eval_windows=64", "--config.data.eval_batch_size=32",
          *[f"--config.model.{k}={v}" for k, v in TINY.items()],
          "--config.train.batch_size=8", "--config.train.log_every=1",
          "--config.train.steps_per_call=1",  # the recipe's 10 would not divide log_every=1
          "--config.train.warmup_steps=2", *overrides]
  env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": str(REPO)}
  for name, value in (env_update or {}).items():
    env.pop(name, None)
    if value is not None:
      env[name] = value
  if popen:
    return subprocess.Popen(args, cwd=REPO, env=env, **popen)
  done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  if check:
    assert done.returncode == 0, done.stderr[-3000:]
  return done


def test_mesh_2x2x2_matches_single_device(data_dir, tmp_path):
  losses = {}
  for name, mesh, devices in [("one", dict(data=1, fsdp=1, tensor=1), jax.devices()[:1]),
                              ("eight", dict(data=2, fsdp=2, tensor=2), jax.devices())]:
    # The recipe's flat gradient all-reduce needs whole parameters: off on the 2x2x2 mesh.
    config = tiny_config(data_dir, tmp_path, num_steps=5, flat_grad_allreduce=name == "one")
    config.mesh.update(mesh)
    loop.train_and_evaluate(config, str(tmp_path / name), devices=devices)
    losses[name] = read_metrics(tmp_path / name, "train/loss")
  assert sorted(losses["one"]) == [1, 2, 3, 4, 5]
  np.testing.assert_allclose([losses["eight"][s] for s in range(1, 6)],
                             [losses["one"][s] for s in range(1, 6)], atol=1e-5, rtol=0)


def test_parameters_are_laid_out_as_the_rules_say():
  config = ModelConfig(family="llama", vocab_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                       width=32, max_length=16)
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  train_config = tiny_train_section()
  state, _ = state_lib.create_train_state(Decoder(config), optimizer.make_optimizer(train_config),
                                          16, mesh, jax.random.key(0))
  block = state.params["block_0"]
  assert block["attn"]["query"]["kernel"].sharding.spec == P("fsdp", "tensor", None)
  assert block["attn"]["out"]["kernel"].sharding.spec == P("tensor", None, "fsdp")
  assert block["mlp"]["down"]["kernel"].sharding.spec == P("tensor", "fsdp")
  assert state.params["embed"]["embedding"].sharding.spec == P("tensor", "fsdp")
  assert block["attn_norm"]["scale"].sharding.spec == P("fsdp")
  # Adam's moments follow their parameters.
  mu = state.opt_state[1][0].mu
  assert mu["block_0"]["mlp"]["down"]["kernel"].sharding.spec == P("tensor", "fsdp")
  # A 63-character vocabulary cannot be split in two: that axis stays whole.
  odd = ModelConfig(family="gpt2", vocab_size=63, num_layers=1, num_heads=2, width=32,
                    max_length=16)
  odd_state, _ = state_lib.create_train_state(Decoder(odd), optimizer.make_optimizer(train_config),
                                              16, mesh, jax.random.key(0))
  assert odd_state.params["embed"]["embedding"].sharding.spec == P(None, "fsdp")


def tiny_train_section():
  from decoder_jax.train import config_sections
  return config_sections.train_section(num_steps=10, warmup_steps=2)


def test_resume_after_process_exit_matches_uninterrupted_run(data_dir, tmp_path):
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  run_cli(straight, data_dir, tmp_path, "--config.train.num_steps=6")
  first = run_cli(resumed, data_dir, tmp_path, "--config.train.num_steps=6",
                  "--config.train.stop_at_step=3")
  assert "final eval/loss" not in first.stdout  # stopped early, without the final eval
  second = run_cli(resumed, data_dir, tmp_path, "--config.train.num_steps=6")
  assert "resumed from" in second.stderr
  a, b = read_metrics(straight, "train/loss"), read_metrics(resumed, "train/loss")
  assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
  assert [a[s] for s in a] == [b[s] for s in a]  # bitwise: same batches, same updates
  params_a = inference.load_trained(str(straight)).params
  params_b = inference.load_trained(str(resumed)).params
  jax.tree.map(np.testing.assert_array_equal, params_a, params_b)
  # checkpoint_every is the recipe's 1000: saves where the loop stops, none at step 1.
  saved = lambda w: sorted(int(p.name) for p in (w / "checkpoints").iterdir() if p.name.isdigit())
  assert saved(straight) == [6] and saved(resumed) == [3, 6]


def test_a_rerun_reads_its_compiled_train_step_from_the_persistent_cache(data_dir, tmp_path):
  cache = tmp_path / "compile_cache"
  # conftest turns the cache off through JAX_COMPILATION_CACHE_DIR; the config's dir is used
  # when that is unset. JAX logs each cache hit, and with JAX_EXPLAIN_CACHE_MISSES each
  # miss, as a warning.
  env = {"JAX_COMPILATION_CACHE_DIR": None, "JAX_LOG_COMPILES": "1",
         "JAX_EXPLAIN_CACHE_MISSES": "1"}
  hit = "Persistent compilation cache hit for 'jit_train_step'"
  miss = "PERSISTENT COMPILATION CACHE MISS"
  runs = [run_cli(tmp_path / f"w{i}", data_dir, tmp_path, "--config.train.num_steps=2",
                  f"--config.compilation_cache_dir={cache}", env_update=env) for i in range(2)]
  assert hit not in runs[0].stderr and miss in runs[0].stderr and any(cache.iterdir())
  # Every program of the rerun, the small ones included, comes from the cache.
  assert hit in runs[1].stderr and miss not in runs[1].stderr, runs[1].stderr[-3000:]
  a, b = read_metrics(tmp_path / "w0", "train/loss"), read_metrics(tmp_path / "w1", "train/loss")
  assert a == b  # the cached program computes the same steps


def test_sigterm_saves_a_checkpoint_then_resume_finishes(data_dir, tmp_path):
  workdir = tmp_path / "w"
  proc = run_cli(workdir, data_dir, tmp_path, "--config.train.num_steps=100000",
                 "--config.train.checkpoint_every=100000",
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 240
  while not (metrics.exists() and metrics.stat().st_size > 0) and time.time() < deadline:
    time.sleep(0.5)
  assert proc.poll() is None, proc.communicate()[1][-3000:]
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 0, stderr[-3000:]
  assert "SIGTERM received" in stderr
  saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert saved and saved[-1] == max(read_metrics(workdir, "train/loss"))
  resumed = inference.load_trained(str(workdir))
  assert resumed.step == saved[-1]


def test_killed_run_resumes_from_its_last_checkpoint(data_dir, tmp_path):
  """SIGKILL (no chance to save): the rerun resumes from the last periodic checkpoint and
  the metrics written after it by the killed run are replaced, not duplicated."""
  workdir = tmp_path / "w"
  proc = run_cli(workdir, data_dir, tmp_path, "--config.train.num_steps=100000",
                 "--config.train.checkpoint_every=2", "--config.train.async_checkpoints=false",
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  while time.time() < deadline:
    lines = (workdir / "metrics.jsonl").read_text() if (workdir / "metrics.jsonl").exists() else ""
    if lines.count("train/loss") >= 5:
      break
    time.sleep(0.2)
  proc.kill()
  proc.wait()
  saved = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  run_cli(workdir, data_dir, tmp_path, f"--config.train.num_steps={saved + 2}")
  losses = read_metrics(workdir, "train/loss")  # asserts no duplicated steps
  assert sorted(losses) == list(range(1, saved + 3))


def test_llama_family_trains(data_dir, tmp_path):
  sys.path.insert(0, str(REPO))
  from configs import shakespeare_llama
  config = shakespeare_llama.get_config("cpu")
  config.model.update(dict(num_layers=2, num_heads=4, num_kv_heads=2, width=32, max_length=32))
  config.train.update(dict(num_steps=40, batch_size=8, log_every=10, eval_every=40,
                           warmup_steps=5, learning_rate=3e-3))
  config.data.update(dict(local_dir=str(data_dir), num_eval_windows=64, eval_batch_size=32,
                          tfds_data_dir=str(tmp_path / "tfds")))
  result = loop.train_and_evaluate(config, str(tmp_path / "w"), devices=jax.devices()[:1])
  losses = read_metrics(tmp_path / "w", "train/loss")
  assert losses[40] < losses[10] - 0.3
  assert result["eval/loss"] < 3.5  # ln 65 = 4.17 is the uniform guess


def test_trained_model_samples_text_in_the_corpus_alphabet(data_dir, tmp_path):
  config = tiny_config(data_dir, tmp_path, num_steps=30, checkpoint_every=30)
  result = loop.train_and_evaluate(config, str(tmp_path / "w"), devices=jax.devices()[:1])
  assert result["eval/loss"] < 4.17  # below uniform over 65 characters (ln 65)
  trained = inference.load_trained(str(tmp_path / "w"))
  text = inference.complete(trained, "ROMEO:", max_new_tokens=80,
                            sampler=decoding.TopK(k=10, temperature=0.8), seed=0)
  alphabet = set((data_dir / "tiny_shakespeare" / "input.txt").read_text())
  assert len(text) == 80 and set(text) <= alphabet  # longer than the 32-token context
  # The CLI prints the prompt followed by the sample.
  cli = subprocess.run([sys.executable, "-m", "decoder_jax.generate", f"--workdir={tmp_path/'w'}",
                        "--prompt=ROMEO:", "--max_new_tokens=20", "--seed=3"], cwd=REPO,
                       env={**os.environ, "XLA_FLAGS": ""}, capture_output=True, text=True,
                       timeout=300)
  assert cli.returncode == 0, cli.stderr[-3000:]
  out = cli.stdout.rstrip("\n")
  assert out.startswith("ROMEO:") and len(out) >= len("ROMEO:") + 15
  assert set(out) <= alphabet
  # A batch from a prompts file, two samples each, stop at a newline, as JSONL.
  (tmp_path / "prompts.txt").write_text("ROMEO:\nJULIET: O\n")
  cli = subprocess.run([sys.executable, "-m", "decoder_jax.generate", f"--workdir={tmp_path/'w'}",
                        f"--prompts_file={tmp_path/'prompts.txt'}", "--max_new_tokens=12",
                        "--num_samples=2", "--stop=\n", "--top_p=0.9",
                        f"--output={tmp_path/'out.jsonl'}"], cwd=REPO,
                       env={**os.environ, "XLA_FLAGS": ""}, capture_output=True, text=True,
                       timeout=300)
  assert cli.returncode == 0, cli.stderr[-3000:]
  rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
  assert [r["prompt"] for r in rows] == ["ROMEO:", "JULIET: O"]
  for row in rows:
    assert len(row["samples"]) == 2 and row["text"] == row["samples"][0]["text"]
    for sample in row["samples"]:
      assert 1 <= len(sample["tokens"]) <= 12 and sample["logprob"] < 0
      assert "\n" not in sample["text"] and set(sample["text"]) <= alphabet
      newline = trained.tokenizer.encode("\n")[0]
      assert newline not in sample["tokens"][:-1]  # a newline can only be the last token


def test_mesh_not_matching_devices_is_a_clear_error():
  with pytest.raises(ValueError, match="has 4 devices but 8 are available"):
    sharding.make_mesh(dict(data=2, fsdp=2, tensor=1))
  with pytest.raises(ValueError, match="not divisible by 3"):
    sharding.make_mesh(dict(data=-1, fsdp=3, tensor=1))


def test_batch_not_divisible_by_data_parallel_size(data_dir, tmp_path):
  # Meshes that fit 2 devices (the recipe's, when this test runs first) or the 8 forced ones.
  config = tiny_config(data_dir, tmp_path, batch_size=7)
  config.mesh.update(dict(data=-1, fsdp=2, tensor=1))
  with pytest.raises(ValueError, match="divisible by the data-parallel size"):
    loop.train_and_evaluate(config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()  # nothing written before the check


def test_flat_gradient_allreduce_on_sharded_parameters_is_refused_up_front(data_dir, tmp_path):
  config = tiny_config(data_dir, tmp_path)  # the CPU recipe sets train.flat_grad_allreduce
  config.mesh.update(dict(data=-1, fsdp=1, tensor=2))
  with pytest.raises(ValueError, match=r"shards them over \['tensor'\]"):
    loop.train_and_evaluate(config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_unknown_config_field_is_rejected_by_the_cli(data_dir, tmp_path):
  done = run_cli(tmp_path / "w", data_dir, tmp_path, "--config.model.widht=64", check=False)
  assert done.returncode != 0
  assert "widht" in done.stderr


def test_checkpoint_from_another_model_shape_is_refused(data_dir, tmp_path):
  config = tiny_config(data_dir, tmp_path, num_steps=2)
  loop.train_and_evaluate(config, str(tmp_path / "w"))
  wider = tiny_config(data_dir, tmp_path, num_steps=4)
  wider.model.width = 64
  with pytest.raises(ValueError, match="different shape"):
    loop.train_and_evaluate(wider, str(tmp_path / "w"))
  # The refused run left the checkpoint as it was.
  assert inference.load_trained(str(tmp_path / "w")).step == 2


def test_init_from_a_workdir_starts_from_its_weights(data_dir, tmp_path):
  """config.init_from: the source's architecture and weights, the config's training choices."""
  source = loop.train_and_evaluate(tiny_config(data_dir, tmp_path), str(tmp_path / "a"))
  config = tiny_config(data_dir, tmp_path, num_steps=2, eval_every=1, learning_rate=0.0,
                       min_learning_rate=0.0)
  config.init_from = str(tmp_path / "a")
  config.model.update(num_layers=7, scan_layers=True)  # num_layers is the source's; scan is ours
  loop.train_and_evaluate(config, str(tmp_path / "b"))
  # A learning rate of 0 leaves the weights as loaded: the source's final validation loss.
  assert read_metrics(tmp_path / "b", "eval/loss")[1] == pytest.approx(source["eval/loss"],
                                                                        abs=1e-5)
  with open(tmp_path / "b" / workdir_lib.MODEL_CONFIG_FILE) as f:
    saved = json.load(f)
  assert (saved["num_layers"], saved["scan_layers"]) == (2, True)
  # A second run resumes from b's own checkpoint (the source is not read again).
  config.train.num_steps = 3
  config.init_from = str(tmp_path / "missing")
  resumed = loop.train_and_evaluate(config, str(tmp_path / "b"))
  assert resumed["eval/loss"] == pytest.approx(source["eval/loss"], abs=1e-5)


def test_training_data_that_ends_early_is_a_clear_error(data_dir, tmp_path, monkeypatch):
  from decoder_jax.data import pipeline

  class FiniteTrain:  # the first 4 batches of the real iterator, then the end
    def __init__(self, inner):
      self.inner, self.left = inner, 4

    def __iter__(self):
      return self

    def __next__(self):
      if not self.left:
        raise StopIteration
      self.left -= 1
      return next(self.inner)

    def get_state(self):
      return {"inner": self.inner.get_state(), "left": self.left}

    def set_state(self, state):
      self.inner.set_state(state["inner"])
      self.left = state["left"]

  real = pipeline.make_datasets

  def finite(*args, **kwargs):
    datasets = real(*args, **kwargs)
    return dataclasses.replace(datasets, train_iter=FiniteTrain(datasets.train_iter))

  monkeypatch.setattr(pipeline, "make_datasets", finite)
  config = tiny_config(data_dir, tmp_path, num_steps=6, steps_per_call=3, checkpoint_every=3,
                       eval_every=3, log_every=3)
  with pytest.raises(RuntimeError, match="ended at step 4, before train.num_steps=6"):
    loop.train_and_evaluate(config, str(tmp_path / "w"))
  # The first call's 3 steps were logged and checkpointed before the short one was refused.
  assert read_metrics(str(tmp_path / "w"), "train/loss").keys() == {3}
  assert "3" in os.listdir(tmp_path / "w" / "checkpoints")


def test_init_from_a_missing_source_is_a_clear_error(data_dir, tmp_path):
  config = tiny_config(data_dir, tmp_path)
  config.init_from = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="nowhere"):
    loop.train_and_evaluate(config, str(tmp_path / "w"))


def test_profile_steps_writes_a_trace(data_dir, tmp_path):
  config = tiny_config(data_dir, tmp_path, num_steps=6, profile_steps=2)
  loop.train_and_evaluate(config, str(tmp_path / "w"), devices=jax.devices()[:1])
  traces = [os.path.join(root, f) for root, _, files in os.walk(tmp_path / "w" / "profile")
            for f in files if f.endswith((".xplane.pb", ".trace.json.gz"))]
  assert traces, os.listdir(tmp_path / "w")
  # The account reads it: the traced steps' matmuls, in the train step's program.
  acc = trace_account.account(str(tmp_path / "w" / "profile"))
  assert acc.kind == "cpu" and acc.by_category.get("matmul", 0) > 0, acc.by_category
  assert any("train_step" in module for module in acc.modules), acc.modules


# Data-parallel steps on two CPU devices, dispatched as fast as the host can: XLA's CPU
# runtime deadlocks in the all-reduce once dozens of steps are queued (it aborts the
# process about a minute later). argv[1]: InFlightSteps' limit.
QUEUED_STEPS_SCRIPT = """
import sys
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_num_cpu_devices", 2)
from jax.sharding import NamedSharding, PartitionSpec as P
from decoder_jax.losses import InFlightSteps
mesh = jax.make_mesh((2,), ("data",))
w = jax.device_put(jnp.full((256, 256), 0.01), NamedSharding(mesh, P()))
rows = NamedSharding(mesh, P("data"))
xs = [jax.device_put(np.random.default_rng(i).normal(size=(512, 256)).astype(np.float32), rows)
      for i in range(50)]

@jax.jit
def step(w, x):  # x: [512 rows split over the devices, 256]; the gradient is all-reduced
  g = jax.grad(lambda w: jnp.tanh(x @ w @ w).sum())(w)
  return w - 1e-3 * g, g.sum()

in_flight = InFlightSteps(int(sys.argv[1]))
for i in range(400):
  w, out = step(w, xs[i % len(xs)])
  in_flight.add(out)
print("finished", float(out))
"""


def test_in_flight_steps_keep_two_device_data_parallel_from_deadlocking():
  # Without the bound (limit 10**6) this script aborts in XLA's all-reduce on a 2-core
  # machine after 50-150 steps; with the loop's default it finishes.
  done = subprocess.run([sys.executable, "-c", QUEUED_STEPS_SCRIPT, "2"], cwd=REPO,
                        env={**os.environ, "XLA_FLAGS": "", "PYTHONPATH": str(REPO)},
                        capture_output=True, text=True, timeout=240)
  assert done.returncode == 0 and "finished" in done.stdout, done.stderr[-2000:]


def test_in_flight_steps_waits_for_the_oldest_beyond_its_limit(monkeypatch):
  waited = []
  monkeypatch.setattr(loop.jax, "block_until_ready", waited.append)
  in_flight = losses.InFlightSteps(2)
  for i in range(5):
    in_flight.add(i)
  assert waited == [0, 1, 2]
  with pytest.raises(ValueError, match="at least 1"):
    losses.InFlightSteps(0)


class _CountingSource:
  """An iterator over 0, 1, ..., n-1 with a grain-style get_state."""

  def __init__(self, n):
    self.position, self.n = 0, n

  def __next__(self):
    if self.position == self.n:
      raise StopIteration
    self.position += 1
    return self.position - 1

  def get_state(self):
    return {"position": self.position}


def test_device_prefetch_reads_one_ahead_and_reports_the_unread_state():
  source = _CountingSource(3)
  moved = []
  batches = feeding.DevicePrefetch(source, lambda bs: moved.append(bs) or bs[0] * 10)
  assert batches.get_state() == {"position": 0}
  assert next(batches) == (1, 0) and moved == [[0], [1]]  # batch 1 already handed over
  assert batches.get_state() == {"position": 1}  # a resume must start at batch 1
  assert [next(batches), next(batches)] == [(1, 10), (1, 20)]
  assert batches.get_state() == {"position": 3}
  with pytest.raises(StopIteration):
    next(batches)


def test_device_prefetch_groups_batches_by_call():
  source = _CountingSource(100)
  batches = feeding.DevicePrefetch(source, lambda bs: list(bs), sizes=[3, 3, 1])
  assert next(batches) == (3, [0, 1, 2])
  assert batches.get_state() == {"position": 3}  # the next call's 3 are read, not returned
  assert next(batches) == (3, [3, 4, 5])
  assert next(batches) == (1, [6])
  assert batches.get_state() == {"position": 7}
  with pytest.raises(StopIteration):
    next(batches)


def test_device_prefetch_hands_over_a_finite_sources_last_partial_call():
  batches = feeding.DevicePrefetch(_CountingSource(8), lambda bs: list(bs), sizes=[3, 3, 3])
  assert [next(batches), next(batches), next(batches)] == [(3, [0, 1, 2]), (3, [3, 4, 5]),
                                                           (2, [6, 7])]
  assert batches.get_state() == {"position": 8}
  with pytest.raises(StopIteration):
    next(batches)


@pytest.mark.parametrize("first, end, per_call, sizes", [
    (0, 10, 1, [1] * 10),
    (0, 10, 5, [5, 5]),
    (0, 12, 5, [5, 5, 1, 1]),  # the tail in single steps
    (3, 12, 4, [1, 4, 4]),     # resumed between multiples of 4
    (6, 6, 3, []),
])
def test_call_sizes_run_whole_calls_from_multiples(first, end, per_call, sizes):
  assert list(feeding.call_sizes(first, end, per_call)) == sizes


def test_steps_per_call_trains_exactly_like_single_steps(data_dir, tmp_path):
  """train.steps_per_call=3: the same batches, updates, logged metrics and checkpoints as
  one step per call; num_steps not a multiple of 3 ends in single steps."""
  results = {}
  for per_call in (1, 3):
    config = tiny_config(data_dir, tmp_path, num_steps=8, log_every=3, eval_every=6,
                         checkpoint_every=3, steps_per_call=per_call)
    workdir = tmp_path / f"per_call_{per_call}"
    final = loop.train_and_evaluate(config, str(workdir), devices=jax.devices()[:1])
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    results[per_call] = (read_metrics(workdir, "train/loss"), read_metrics(workdir, "eval/loss"),
                         saved, final["eval/loss"],
                         inference.load_trained(str(workdir)).params)
  single, multi = results[1], results[3]
  assert sorted(single[0]) == [3, 6, 8] and sorted(single[1]) == [6, 8]
  assert single[2] == multi[2] == [3, 6, 8]
  for a, b in zip(single[:2], multi[:2]):
    assert sorted(a) == sorted(b)
    np.testing.assert_allclose([a[k] for k in sorted(a)], [b[k] for k in sorted(b)],
                               rtol=1e-6)
  assert multi[3] == pytest.approx(single[3], rel=1e-6)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7),
               single[4], multi[4])


def test_steps_per_call_must_divide_the_host_intervals(data_dir, tmp_path):
  config = tiny_config(data_dir, tmp_path, steps_per_call=2, log_every=2)  # eval_every=3
  with pytest.raises(ValueError, match=r"steps_per_call \(2\) must divide train.eval_every"):
    loop.train_and_evaluate(config, str(tmp_path / "w"))


def test_checkpoint_of_replicated_state_saves_without_compiling_and_restores(tmp_path):
  """On CPU devices a save copies each replicated array out whole (checkpoint.
  _state_handler). Orbax's default would cut every array into one slice per device with a
  compiled slice op on the step loop's thread (the shakespeare CPU recipe's first save
  blocked the loop for 0.9 s)."""
  from jax.sharding import NamedSharding
  from decoder_jax.train import checkpoint
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  replicated = NamedSharding(mesh, P())
  state = {"kernel": jax.device_put(np.arange(88 * 56, dtype=np.float32).reshape(88, 56),
                                    replicated),
           "scale": jax.device_put(np.linspace(0, 1, 56, dtype=np.float32), replicated)}
  compiles = []

  def record(name, seconds, **kwargs):
    if name == "/jax/core/compile/backend_compile_duration":
      compiles.append(seconds)

  manager = checkpoint.make_manager(str(tmp_path), 1, 1)
  jax.monitoring.register_event_duration_secs_listener(record)
  try:
    checkpoint.save(manager, 1, state, {"position": 7})
    manager.wait_until_finished()
  finally:
    jax.monitoring.unregister_event_duration_listener(record)
  assert compiles == []
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
  restored, data_state = checkpoint.restore(manager, abstract)
  manager.close()
  assert data_state == {"position": 7}
  for name, value in state.items():
    np.testing.assert_array_equal(restored[name], value)
    assert restored[name].sharding == replicated


def test_best_params_are_replaced_only_once_the_new_copy_is_complete(tmp_path, monkeypatch):
  """checkpoint.save_params_replacing (the fine-tuning loop's best checkpoint): a save
  that dies half-way leaves the previous copy (still found if the crash fell between the
  final renames); a finished one replaces it, leaving no staging directories; copies
  written by orbax's StandardCheckpointer (older runs) still restore."""
  import orbax.checkpoint as ocp
  from jax.sharding import NamedSharding
  from decoder_jax.train import checkpoint
  sharding = NamedSharding(jax.make_mesh((jax.device_count(),), ("data",)), P())
  first = {"w": jax.device_put(np.arange(24, dtype=np.float32).reshape(4, 6), sharding)}
  second = {"w": jax.device_put(-np.arange(24, dtype=np.float32).reshape(4, 6), sharding)}
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          first)
  best = str(tmp_path / "best")
  checkpoint.save_params_replacing(best, first)
  np.testing.assert_array_equal(workdir_lib.restore_params_dir(best, abstract)["w"], first["w"])

  def dies_half_way(self, directory, *args, **kwargs):
    os.makedirs(directory)  # part of a copy, as a crash would leave it
    raise RuntimeError("killed during the save")

  with monkeypatch.context() as patch:
    patch.setattr(ocp.Checkpointer, "save", dies_half_way)
    with pytest.raises(RuntimeError, match="killed"):
      checkpoint.save_params_replacing(best, second)
  np.testing.assert_array_equal(workdir_lib.restore_params_dir(best, abstract)["w"], first["w"])
  os.rename(best, best + ".old")  # as a crash between the two renames leaves it
  np.testing.assert_array_equal(workdir_lib.restore_params_dir(best, abstract)["w"], first["w"])

  checkpoint.save_params_replacing(best, second)
  restored = workdir_lib.restore_params_dir(best, abstract)["w"]
  np.testing.assert_array_equal(restored, second["w"])
  assert restored.sharding == sharding
  assert sorted(os.listdir(tmp_path)) == ["best"]

  older = str(tmp_path / "older")
  with ocp.StandardCheckpointer() as writer:
    writer.save(older, first)
  np.testing.assert_array_equal(workdir_lib.restore_params_dir(older, abstract)["w"], first["w"])


def test_train_and_eval_steps_compile_once_on_the_compile_workers(data_dir, tmp_path, caplog):
  """The loop runs the steps compiled ahead (while the parameters were initialised or
  restored) and never compiles them again on the main thread."""

  def compiles_of_a_run(num_steps):
    config = tiny_config(data_dir, tmp_path, num_steps=num_steps, log_every=3, eval_every=3,
                         checkpoint_every=3, steps_per_call=3)
    caplog.clear()
    previous = jax.config.jax_log_compiles
    jax.config.update("jax_log_compiles", True)  # global: the workers see it too
    try:
      with caplog.at_level("WARNING"):
        loop.train_and_evaluate(config, str(tmp_path / "w"))
    finally:
      jax.config.update("jax_log_compiles", previous)
    compiles = [(r.threadName, r.getMessage()) for r in caplog.records
                if r.getMessage().startswith("Finished XLA compilation of jit(")]
    steps_ = [c for c in compiles if "jit(multi_step)" in c[1] or "jit(train_step)" in c[1]]
    assert all(thread.startswith("compile_ahead") for thread, _ in steps_), compiles
    ahead = [c for c in compiles if c[0].startswith("compile_ahead")]
    return steps_, ahead

  steps_, ahead = compiles_of_a_run(7)  # calls of 3, 3, then 1 step
  assert sorted(m.split()[4] for _, m in steps_) == ["jit(multi_step)", "jit(train_step)"]
  assert len(ahead) == 3, ahead  # and the eval step's
  steps_, ahead = compiles_of_a_run(10)  # resumed at step 7: three single steps
  assert [m.split()[4] for _, m in steps_] == ["jit(train_step)"]
  assert len(ahead) == 2, ahead


def test_peeking_at_the_batch_shapes_leaves_the_training_iterator_in_place(data_dir, tmp_path):
  from decoder_jax.data import pipeline
  config = tiny_config(data_dir, tmp_path)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:2])

  def fresh_iterator():
    return pipeline.make_datasets(config.data, seq_len=16, global_batch_size=8,
                                  seed=config.seed).train_iter

  expected = [next(fresh_iterator()) for _ in range(1)][0]
  iterator = fresh_iterator()
  shapes = feeding.peek_abstract_batch(iterator, sharding.batch_sharding(mesh))
  assert {k: (v.shape, v.dtype) for k, v in shapes.items()} == {
      k: (np.shape(v), np.asarray(v).dtype) for k, v in expected.items()}
  assert all(s.sharding == sharding.batch_sharding(mesh) for s in shapes.values())
  first = next(iterator)
  for key in expected:
    np.testing.assert_array_equal(first[key], expected[key])
