"""Faults, each done for real: a kill during an asynchronous checkpoint write, a truncated
latest checkpoint, a loss that turns nan, a disk that fills during a save."""

import logging
import pathlib
import shutil
import signal
import subprocess
import time

import flax.linen as nn
import jax
import numpy as np
import pytest

from decoder_jax import inference, workdir as workdir_lib
from decoder_jax.model import Decoder, ModelConfig
from decoder_jax.train import checkpoint, config_sections, loop, setup, state as state_lib, steps
from test_multiprocess import saved_steps
from test_train import read_metrics, run_cli, tiny_config

# A fixed schedule, so runs started for different numbers of steps take the same steps.
FIXED_SCHEDULE = "--config.train.decay_steps=40"


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
  """run_cli's env_update for one persistent compilation cache: the reruns of a test (the
  resume, the run to compare with) read their programs from it."""
  return {"JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("compile_cache"))}


def test_kill_during_an_asynchronous_checkpoint_write_resumes_from_the_last_complete_one(
    data_dir, tmp_path, cached):
  workdir = tmp_path / "killed"
  proc = run_cli(workdir, data_dir, tmp_path, "--config.train.num_steps=100000",
                 FIXED_SCHEDULE, "--config.train.checkpoint_every=2",
                 "--config.train.keep_checkpoints=100", "--config.train.async_checkpoints=true",
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env_update=cached)
  checkpoints, deadline = workdir / "checkpoints", time.time() + 240
  writing = []  # orbax writes a step into <step>.orbax-checkpoint-tmp, renamed when complete
  while not writing and time.time() < deadline:
    if checkpoints.is_dir() and saved_steps(workdir):  # not the first write: one is complete
      writing = [p for p in checkpoints.iterdir() if "tmp" in p.name]
    assert proc.poll() is None
    time.sleep(0.002)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert writing and any(p.exists() for p in writing), "the kill came after the write"
  complete = saved_steps(workdir)[-1]
  assert all(int(p.name.split(".")[0]) > complete for p in writing if p.exists())

  end = complete + 4
  resumed = run_cli(workdir, data_dir, tmp_path, f"--config.train.num_steps={end}",
                    FIXED_SCHEDULE, "--config.train.checkpoint_every=2", env_update=cached)
  assert f"at step {complete}" in resumed.stderr
  assert not [p for p in checkpoints.iterdir() if "tmp" in p.name]  # the partial one is gone
  straight = tmp_path / "straight"
  run_cli(straight, data_dir, tmp_path, f"--config.train.num_steps={end}", FIXED_SCHEDULE, env_update=cached)
  assert read_metrics(workdir, "train/loss") == read_metrics(straight, "train/loss")
  assert read_metrics(workdir, "eval/loss")[end] == read_metrics(straight, "eval/loss")[end]


def test_a_truncated_latest_checkpoint_falls_back_to_the_one_before(data_dir, tmp_path, caplog):
  caplog.set_level(logging.INFO)
  workdir, one_device = str(tmp_path / "w"), jax.devices()[:1]
  train = lambda steps, directory, **more: loop.train_and_evaluate(
      tiny_config(data_dir, tmp_path, num_steps=steps, decay_steps=6, **more), directory,
      devices=one_device)
  train(4, workdir, checkpoint_every=2)
  data_files = [p for p in pathlib.Path(workdir, "checkpoints", "4", "state").rglob("*")
                if p.is_file() and "/d/" in str(p)]
  largest = max(data_files, key=lambda p: p.stat().st_size)
  with open(largest, "r+b") as f:  # cut to a third, as a crash of the storage might
    f.truncate(largest.stat().st_size // 3)

  resumed = train(6, workdir, checkpoint_every=2)
  assert "the checkpoint at step 4 cannot be read" in caplog.text
  assert "resumed from" in caplog.text and "at step 2" in caplog.text
  assert (pathlib.Path(workdir) / workdir_lib.UNREADABLE_DIR / "4" / "state").is_dir()
  straight = train(6, str(tmp_path / "straight"))
  assert resumed["eval/loss"] == straight["eval/loss"]
  assert read_metrics(workdir, "train/loss") == read_metrics(tmp_path / "straight", "train/loss")


def test_a_nan_loss_stops_the_run_naming_the_step_and_keeps_the_good_checkpoints(
    data_dir, tmp_path, cached):
  workdir = tmp_path / "w"
  run_cli(workdir, data_dir, tmp_path, "--config.train.num_steps=4",
          "--config.train.checkpoint_every=2", env_update=cached)
  # Resumed with an absurd learning rate, the first update sends the weights to ~1e30 and
  # the next loss is nan.
  failed = run_cli(workdir, data_dir, tmp_path, "--config.train.num_steps=10",
                   "--config.train.checkpoint_every=2", "--config.train.learning_rate=1e30",
                   check=False, env_update=cached)
  assert failed.returncode == 1, failed.stderr[-3000:]
  last = failed.stderr.strip().splitlines()[-1]
  assert last.startswith("error: the training loss or gradient became nan at step 6;"), last
  assert "the last checkpoint, step 4, predates it" in last and "Traceback" not in failed.stderr
  assert saved_steps(workdir) == [2, 4]  # no checkpoint of the ruined state
  assert inference.load_trained(str(workdir)).step == 4


def test_skipping_nonfinite_steps_stops_after_too_many_in_a_row(data_dir, tmp_path, cached):
  workdir = tmp_path / "w"
  run_cli(workdir, data_dir, tmp_path, "--config.train.num_steps=4",
          "--config.train.checkpoint_every=2", "--config.train.on_nonfinite=skip", env_update=cached)
  failed = run_cli(workdir, data_dir, tmp_path, "--config.train.num_steps=20",
                   "--config.train.checkpoint_every=2", "--config.train.learning_rate=1e30",
                   "--config.train.on_nonfinite=skip", "--config.train.max_nonfinite_skips=3",
                   check=False, env_update=cached)
  assert failed.returncode == 1, failed.stderr[-3000:]
  last = failed.stderr.strip().splitlines()[-1]
  assert "more than train.max_nonfinite_skips=3 steps in a row had non-finite" in last, last
  skipped = read_metrics(workdir, "train/skipped_steps")
  assert max(skipped.values()) >= 3


def test_a_skipped_step_leaves_the_parameters_unchanged_and_training_goes_on():
  config = ModelConfig(vocab_size=32, num_layers=1, num_heads=2, width=16, max_length=8)
  model = Decoder(config)
  train = config_sections.train_section(num_steps=10, warmup_steps=1, on_nonfinite="skip")
  tx = setup.make_optimizer(train, config)
  params = nn.unbox(model.init(jax.random.key(0), np.zeros((1, 8), np.int32))["params"])
  state = state_lib.TrainState(step=np.int32(0), params=params, opt_state=tx.init(params), tx=tx)
  step_fn = jax.jit(steps.make_train_step(model, 1, dropout=False))
  tokens = np.arange(16, dtype=np.int32).reshape(2, 8) % 32
  good = {"inputs": tokens, "targets": (tokens + 1) % 32, "weights": np.ones((2, 8), np.float32)}
  bad = {**good, "weights": np.full((2, 8), np.nan, np.float32)}
  after_bad, metrics = step_fn(state, {}, bad, jax.random.key(1))
  assert not np.isfinite(float(metrics["loss"]))
  jax.tree.map(np.testing.assert_array_equal, after_bad.params, state.params)
  assert int(after_bad.step) == 1 and int(after_bad.opt_state.total_notfinite) == 1
  after_good, metrics = step_fn(after_bad, {}, good, jax.random.key(2))
  assert np.isfinite(float(metrics["loss"])) and int(after_good.opt_state.notfinite_count) == 0
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), after_good.params,
                                         state.params))
  assert any(changed)


@pytest.fixture
def small_disk(tmp_path):
  """A 24 MiB tmpfs at tmp_path/disk (needs the right to mount, as root on CI has)."""
  disk = tmp_path / "disk"
  disk.mkdir()
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(disk)],
                           capture_output=True, text=True)
  if mounted.returncode != 0:
    pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
  yield disk
  subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_disk_that_fills_during_a_save_is_a_clear_error_and_keeps_the_last_checkpoint(
    data_dir, tmp_path, small_disk, cached):
  # The recipe's own model (0.8M parameters): each checkpoint of the state takes ~10 MB.
  workdir = small_disk / "w"
  recipe_model = ["--config.model.num_layers=4", "--config.model.num_heads=4",
                  "--config.model.width=128", "--config.model.max_length=64"]
  failed = run_cli(workdir, data_dir, tmp_path, "--config.train.num_steps=100000",
                   FIXED_SCHEDULE, "--config.train.checkpoint_every=2",
                   "--config.train.keep_checkpoints=10", *recipe_model, check=False, env_update=cached)
  assert failed.returncode == 1, failed.stderr[-3000:]
  last = failed.stderr.strip().splitlines()[-1]
  assert last.startswith("error: writing into") and "no space left on the device" in last, last
  assert "Traceback" not in failed.stderr
  kept = saved_steps(workdir)
  assert kept and f"the last complete checkpoint, step {kept[-1]}, is intact" in last
  # Given room again, the same command resumes from that checkpoint.
  shutil.copytree(workdir, tmp_path / "moved")
  resumed = run_cli(tmp_path / "moved", data_dir, tmp_path,
                    f"--config.train.num_steps={kept[-1] + 2}", FIXED_SCHEDULE, *recipe_model, env_update=cached)
  assert f"at step {kept[-1]}" in resumed.stderr
