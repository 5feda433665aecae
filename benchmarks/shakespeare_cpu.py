"""Side-by-side CPU benchmark: decoder_jax vs. a PyTorch eager reference.

Both sides train the shakespeare-char CPU recipe (4 layers, width 128, context 64,
batch 12, 2000 steps; see benchmarks/torch_reference_shakespeare.py) and each is
timed as a whole subprocess, wall clock: interpreter start, imports, data
loading, compilation, training and evaluation all count.

  (a) python -m decoder_jax.train --config=configs/shakespeare_char.py:cpu \
          --workdir=<fresh tmp dir> [extra args after --]
      final loss: "eval/loss" of the last line of <workdir>/metrics.jsonl
      that has one.
  (b) python benchmarks/torch_reference_shakespeare.py [--steps N] [--threads N]
      final loss: "final_val_loss" of the JSON line it prints last.

Both run with the same interpreter, the same working directory and the same
environment; DECODER_JAX_DATA is set for both from --data_dir. By default each
side uses every core it can see (torch: set_num_threads(cores), XLA: its default
thread pool). With --threads N < cores, both processes are pinned to the same N
cores with taskset and torch gets --threads N.

Usage:
  python benchmarks/shakespeare_cpu.py --data_dir /path/to/data [--repeats 3]
  python benchmarks/shakespeare_cpu.py --skip_jax --steps 200     # torch only
  python benchmarks/shakespeare_cpu.py -- --config.train.batch_size=12  # extra JAX args
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from machine import busy_cpu_seconds, cores, cpu_name, matmul_features, version  # benchmarks/machine.py

REPO = pathlib.Path(__file__).resolve().parents[1]
TORCH_SCRIPT = REPO / "benchmarks" / "torch_reference_shakespeare.py"
JAX_MODULE = "decoder_jax.train"
JAX_CONFIG = "configs/shakespeare_char.py:cpu"
# ConfigDict override that sets the number of training steps on the JAX side.
JAX_STEPS_OVERRIDE = "--config.train.num_steps"
JAX_LOSS_KEY = "eval/loss"

TARGET_RATIO = 0.67  # decoder_jax wall time <= 0.67x PyTorch's ...
# ... at equal or better final validation loss. Both losses are means over a few
# hundred random validation windows drawn by different RNGs (standard error about
# 0.01), so "equal" allows this much:
DEFAULT_LOSS_TOLERANCE = 0.0  # strict: "equal or better"; raise it to allow eval noise




def _tail(path: pathlib.Path, n: int = 30) -> str:
  try:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
  except OSError:
    return ""


def _children_cpu_seconds():
  ru = resource.getrusage(resource.RUSAGE_CHILDREN)
  return ru.ru_utime + ru.ru_stime


def _run(cmd, env, log_path: pathlib.Path, cores: int):
  """Runs cmd from the repo root.

  Returns (wall seconds, return code, others): others is the share of the
  machine's cores that processes other than cmd kept busy while it ran (a
  contention check: near 0 on an otherwise idle machine), or None.
  """
  busy0, child0 = busy_cpu_seconds(), _children_cpu_seconds()
  with open(log_path, "w") as log:
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log,
                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
                        ).returncode
    wall = time.perf_counter() - t0
  busy1, child1 = busy_cpu_seconds(), _children_cpu_seconds()
  others = None
  if busy0 is not None and busy1 is not None:
    others = max(0.0, (busy1 - busy0) - (child1 - child0)) / (wall * cores)
  return wall, rc, others


def run_jax(args, env, prefix, log_dir, tag):
  workdir = pathlib.Path(tempfile.mkdtemp(prefix=f"shakespeare_jax_{tag}_"))
  cmd = prefix + [sys.executable, "-m", JAX_MODULE, f"--config={JAX_CONFIG}",
                  f"--workdir={workdir}"]
  if args.steps is not None:
    cmd.append(f"{JAX_STEPS_OVERRIDE}={args.steps}")
  cmd += args.jax_extra
  log = log_dir / f"jax_{tag}.log"
  wall, rc, others = _run(cmd, env, log, cores())
  result = {"side": "decoder_jax", "wall": wall, "rc": rc, "others": others,
            "log": str(log), "cmd": cmd, "workdir": str(workdir)}
  metrics = workdir / "metrics.jsonl"
  if rc == 0 and metrics.exists():
    last, evals = None, 0
    for line in metrics.read_text().splitlines():
      line = line.strip()
      if not line:
        continue
      row = json.loads(line)
      if JAX_LOSS_KEY in row:
        last, evals = row, evals + 1
    if last is not None:
      result.update(loss=float(last[JAX_LOSS_KEY]), step=last.get("step"),
                    evals=evals)
  if "loss" not in result:
    result["error"] = (f"exit code {rc}; no {JAX_LOSS_KEY!r} in {metrics}\n"
                       + _tail(log))
  if not args.keep_workdirs and "error" not in result:
    shutil.rmtree(workdir, ignore_errors=True)
  return result


def run_torch(args, env, prefix, log_dir, tag, threads):
  cmd = prefix + [sys.executable, str(TORCH_SCRIPT), f"--threads={threads}"]
  if args.steps is not None:
    cmd.append(f"--steps={args.steps}")
  cmd += args.torch_arg
  log = log_dir / f"torch_{tag}.log"
  wall, rc, others = _run(cmd, env, log, cores())
  result = {"side": "pytorch", "wall": wall, "rc": rc, "others": others,
            "log": str(log), "cmd": cmd}
  lines = log.read_text(errors="replace").splitlines()
  # The JSON line is the script's last stdout line; stderr shares the log, so
  # take the last line that parses.
  for line in reversed(lines if rc == 0 else []):
    try:
      out = json.loads(line)
      result.update(loss=float(out["final_val_loss"]), step=out["steps"],
                    evals=out["evals"], train_seconds=out["train_seconds"])
      break
    except (ValueError, KeyError, TypeError):
      continue
  if "loss" not in result:
    result["error"] = f"exit code {rc}; no final JSON line\n" + _tail(log)
  return result


def _fmt(x, spec):
  return "n/a" if x is None else format(x, spec)


def _pct(x):
  return "n/a" if x is None else f"{100 * x:.0f}%"


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  jax_extra = []
  if "--" in argv:
    i = argv.index("--")
    argv, jax_extra = argv[:i], argv[i + 1:]
  p = argparse.ArgumentParser(
      description=__doc__.split("\n")[0],
      epilog="Arguments after a lone -- are passed on to decoder_jax.train.")
  p.add_argument("--repeats", type=int, default=1,
                 help="runs per side; medians are quoted, the order alternates")
  p.add_argument("--data_dir", default=None,
                 help="sets DECODER_JAX_DATA for both sides (default: the "
                      "environment's, else <repo>/../shared/data if present)")
  p.add_argument("--steps", type=int, default=None,
                 help="override the number of training steps on both sides")
  p.add_argument("--threads", type=int, default=None,
                 help="cores for each side (default: all); fewer than all pins "
                      "both processes to the same cores with taskset")
  p.add_argument("--skip_jax", action="store_true")
  p.add_argument("--skip_torch", action="store_true")
  p.add_argument("--torch_arg", action="append", default=[],
                 help="extra argument for the torch script (repeatable)")
  p.add_argument("--loss_tolerance", type=float,
                 default=DEFAULT_LOSS_TOLERANCE,
                 help="jax loss may exceed torch loss by this and count as equal")
  p.add_argument("--compile_cache", choices=("cold", "warm"), default="cold",
                 help="JAX's persistent compilation cache: cold = an empty cache directory "
                      "per run (every program compiles, as in a first run); warm = one "
                      "directory, filled by an untimed run first (a rerun of the recipe)")
  p.add_argument("--keep_workdirs", action="store_true")
  p.add_argument("--log_dir", default=None,
                 help="where subprocess logs go (default: a fresh tmp dir)")
  p.add_argument("--json_out", default=None, help="also write results here")
  args = p.parse_args(argv)
  args.jax_extra = jax_extra

  env = dict(os.environ)
  data_dir = args.data_dir or env.get("DECODER_JAX_DATA")
  if not data_dir and (REPO.parent / "shared" / "data").is_dir():
    data_dir = str(REPO.parent / "shared" / "data")
  if data_dir:
    env["DECODER_JAX_DATA"] = os.path.abspath(data_dir)

  num_cores = cores()
  threads = args.threads or num_cores
  prefix = []
  if threads < num_cores:
    if not shutil.which("taskset"):
      p.error("--threads below the core count needs taskset")
    prefix = ["taskset", "-c", f"0-{threads - 1}"]

  log_dir = pathlib.Path(args.log_dir or tempfile.mkdtemp(
      prefix="shakespeare_cpu_logs_"))
  log_dir.mkdir(parents=True, exist_ok=True)

  sides = [s for s, skip in (("jax", args.skip_jax), ("torch", args.skip_torch))
           if not skip]
  if not sides:
    p.error("nothing to run")
  # The launcher keeps compiled programs in a persistent cache (decoder_jax/compile_cache.py);
  # the benchmark decides whether runs find it empty or filled.
  cache_root = pathlib.Path(tempfile.mkdtemp(prefix="shakespeare_jax_compile_cache_"))

  def jax_env(tag):
    directory = cache_root if args.compile_cache == "warm" else cache_root / f"run_{tag}"
    return {**env, "JAX_COMPILATION_CACHE_DIR": str(directory)}

  if "jax" in sides and args.compile_cache == "warm":
    print("[warm-up] an untimed decoder_jax run fills the compilation cache ...", flush=True)
    res = run_jax(args, jax_env("warmup"), prefix, log_dir, "warmup")
    print(f"  warm-up: {res['wall']:.1f} s" if "error" not in res
          else f"  warm-up FAILED: {res['error']}", flush=True)
  load_before = os.getloadavg()
  results = {"jax": [], "torch": []}
  for r in range(args.repeats):
    order = sides if r % 2 == 0 else sides[::-1]
    for side in order:
      print(f"[repeat {r + 1}/{args.repeats}] running {side} ...", flush=True)
      if side == "jax":
        res = run_jax(args, jax_env(r), prefix, log_dir, r)
      else:
        res = run_torch(args, env, prefix, log_dir, r, threads)
      results[side].append(res)
      if "error" in res:
        print(f"  {side} FAILED: {res['error']}", flush=True)
      else:
        print(f"  {side}: {res['wall']:.1f} s wall, final val loss "
              f"{res['loss']:.4f} (step {res.get('step')}), other processes "
              f"busy {_pct(res['others'])} of the cores", flush=True)
  load_after = os.getloadavg()
  shutil.rmtree(cache_root, ignore_errors=True)

  def summary(side):
    ok = [x for x in results[side] if "error" not in x]
    if not ok:
      return None
    return {"wall": statistics.median(x["wall"] for x in ok),
            "walls": [x["wall"] for x in ok],
            "others": [x["others"] for x in ok],
            "loss": statistics.median(x["loss"] for x in ok),
            "step": ok[-1].get("step"), "evals": ok[-1].get("evals"),
            "runs": len(ok)}

  s_jax, s_torch = summary("jax"), summary("torch")

  print()
  print("## shakespeare-char CPU recipe: decoder_jax vs PyTorch eager")
  print()
  print(f"- machine: {num_cores} CPU cores usable ({os.cpu_count()} in the OS), "
        f"{cpu_name()} ({matmul_features()}); threads per side: "
        f"{threads}{' (taskset)' if prefix else ''}")
  print(f"- python {platform.python_version()}, torch {version('torch')}, "
        f"jax {version('jax')}, jaxlib {version('jaxlib')}, "
        f"flax {version('flax')}, optax {version('optax')}")
  print(f"- JAX compilation cache: {args.compile_cache} ("
        + ("an empty cache directory per run: every program compiles" if args.compile_cache
           == "cold" else "filled by an untimed run before the timed ones") + ")")
  print(f"- DECODER_JAX_DATA={env.get('DECODER_JAX_DATA', '(unset)')}; "
        f"XLA_FLAGS={env.get('XLA_FLAGS', '(unset)')}")
  print(f"- load average (1 min) before / after: {load_before[0]:.2f} / "
        f"{load_after[0]:.2f}; 'others busy' = share of all cores used by "
        f"processes other than the timed one while it ran (contention if well "
        f"above 0%)")
  print(f"- repeats: {args.repeats} (median quoted; order alternates); "
        f"logs in {log_dir}")
  print("- wall seconds are whole processes: interpreter start, imports, data "
        "loading, compilation, training and evaluation")
  print()
  print("| side | wall s (median) | all runs, s | final val loss | steps | "
        "evals | others busy |")
  print("|---|---:|---|---:|---:|---:|---|")
  torch_name = " ".join(["pytorch eager"] + args.torch_arg)
  for name, s in (("decoder_jax", s_jax), (torch_name, s_torch)):
    if s is None:
      print(f"| {name} | n/a | | n/a | | | |")
      continue
    walls = ", ".join(f"{w:.1f}" for w in s["walls"])
    print(f"| {name} | {s['wall']:.1f} | {walls} | {s['loss']:.4f} | "
          f"{_fmt(s['step'], '')} | {_fmt(s['evals'], '')} | "
          f"{', '.join(_pct(o) for o in s['others'])} |")
  print()
  verdict = None
  if s_jax and s_torch:
    ratio = s_jax["wall"] / s_torch["wall"]
    dloss = s_jax["loss"] - s_torch["loss"]
    fast = ratio <= TARGET_RATIO
    good = dloss <= args.loss_tolerance
    verdict = "MET" if fast and good else "NOT MET"
    print(f"jax_wall / torch_wall = **{ratio:.3f}** (target <= {TARGET_RATIO} "
          f"at equal or better loss); loss jax - torch = {dloss:+.4f} "
          f"(tolerance {args.loss_tolerance}) -> target {verdict}")
  else:
    print("jax_wall / torch_wall = n/a (a side was skipped or failed; target "
          f"<= {TARGET_RATIO} at equal or better loss)")

  if args.json_out:
    with open(args.json_out, "w") as f:
      json.dump({"jax": results["jax"], "torch": results["torch"],
                 "summary": {"jax": s_jax, "torch": s_torch,
                             "verdict": verdict},
                 "cores": num_cores, "threads": threads,
                 "compile_cache": args.compile_cache}, f, indent=1)
  failed = any("error" in x for side in sides for x in results[side])
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
