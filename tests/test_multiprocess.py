"""Two processes joined by jax.distributed (launch/local.sh) train the shakespeare-char CPU
recipe like one process with two devices: the same losses, a stop signal to either process
agreed by both, kill and resume."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO
from test_train import read_metrics

CONFIG = str(REPO / "configs" / "shakespeare_char.py")
STEPS = 80
# The recipe itself (4 layers, width 128, 10 steps per call), cut to STEPS steps. decay_steps
# fixes the learning-rate schedule, so a run started for more steps (to be stopped or
# killed part way) takes exactly the same first STEPS steps.
RECIPE = [f"--config={CONFIG}:cpu", f"--config.train.decay_steps={STEPS}",
          "--config.train.log_every=10", "--config.train.eval_every=40",
          "--config.train.checkpoint_every=10", "--config.data.num_eval_windows=96",
          "--config.data.eval_batch_size=32"]
ENDLESS = "--config.train.num_steps=100000"
TO_THE_END = f"--config.train.num_steps={STEPS}"


def environment(cache):
  # The test process forces 8 CPU devices through XLA_FLAGS (conftest); each child sets its
  # own count through mesh.num_cpu_devices. The launches after the first read their
  # programs from one persistent compilation cache.
  return {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": str(REPO), "PYTHON": sys.executable,
          "JAX_COMPILATION_CACHE_DIR": str(cache)}


def one_process(workdir, cache):
  done = subprocess.run([sys.executable, "-m", "decoder_jax.train", *RECIPE, TO_THE_END,
                         f"--workdir={workdir}", "--config.mesh.num_cpu_devices=2",
                         "--config.mesh.data=2"],
                        cwd=REPO, env=environment(cache), capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]


def two_processes(workdir, logs, cache, *flags):
  """launch/local.sh 2 (one CPU device each), started: (Popen, [pid of each process])."""
  proc = subprocess.Popen([str(REPO / "launch" / "local.sh"), f"--log_dir={logs}", "2", "--",
                           *RECIPE, *flags, f"--workdir={workdir}"],
                          cwd=REPO, env=environment(cache), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True)
  pids = []
  while len(pids) < 2:  # local.sh names each process's pid first
    line = proc.stderr.readline()
    assert line, f"local.sh ended early: {proc.communicate()}"
    found = re.match(r"local.sh: process (\d): pid (\d+)", line)
    if found:
      pids.append(int(found.group(2)))
  return proc, pids


def finish(proc, timeout=300):
  stdout, stderr = proc.communicate(timeout=timeout)
  return proc.returncode, stdout, stderr


def saved_steps(workdir):
  directory = workdir / "checkpoints"
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def wait_for_checkpoint(workdir, after: int, proc, timeout=240):
  deadline = time.time() + timeout
  while time.time() < deadline:
    steps = [s for s in saved_steps(workdir) if s > after]
    if steps:
      return steps[0]
    assert proc.poll() is None, finish(proc)[2][-3000:]
    time.sleep(0.02)
  pytest.fail(f"no checkpoint after step {after} in {timeout} s")


def stopped_at(text):
  found = re.findall(r"stopped by .* at step (\d+)", text)
  assert len(found) == 1, text[-3000:]
  return int(found[0])


def test_two_processes_stop_together_resume_after_a_kill_and_match_one_process(tmp_path):
  reference, workdir, logs = tmp_path / "one", tmp_path / "two", tmp_path / "logs"
  cache = tmp_path / "compile_cache"
  one_process(reference, cache)

  # SIGTERM to process 1 alone: both processes save the same step and exit cleanly.
  proc, pids = two_processes(workdir, logs, cache, ENDLESS)
  first = wait_for_checkpoint(workdir, 0, proc)
  os.kill(pids[1], signal.SIGTERM)
  code, _, stderr0 = finish(proc)
  stderr1 = (logs / "process_1.log").read_text()
  assert code == 0, stderr0[-3000:] + stderr1[-3000:]
  assert "SIGTERM received" in stderr1 and "another process received a stop signal" in stderr0
  stop = stopped_at(stderr0)
  assert stopped_at(stderr1) == stop and first < stop < STEPS - 20
  assert saved_steps(workdir)[-1] == stop

  # Resumed, then killed (SIGKILL to both, no chance to save) after its next checkpoint.
  proc, _ = two_processes(workdir, logs, cache, ENDLESS)
  killed_after = wait_for_checkpoint(workdir, stop, proc)
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  assert killed_after < STEPS

  # Resumed again to the end: every logged loss and the evaluations as one process had them.
  proc, _ = two_processes(workdir, logs, cache, TO_THE_END)
  code, stdout, stderr0 = finish(proc)
  assert code == 0, stderr0[-3000:]
  assert re.search(rf"resumed from .* at step {killed_after}\b", stderr0)
  assert "final eval/loss" in stdout
  for key in ("train/loss", "eval/loss"):
    ours, theirs = read_metrics(workdir, key), read_metrics(reference, key)
    assert sorted(ours) == sorted(theirs) == (
        list(range(10, STEPS + 1, 10)) if key == "train/loss" else [40, 80])
    for step in theirs:
      assert ours[step] == pytest.approx(theirs[step], abs=1e-5), (key, step)
