"""Side-by-side CPU benchmark: decoder_jax vs. a PyTorch eager reference.

Both sides train the shakespeare-char CPU recipe, each timed as a whole subprocess by wall
clock (interpreter start, imports, data, compilation, training, evaluation):
  decoder_jax  python -m decoder_jax.train --config=configs/shakespeare_char.py:cpu
               --workdir=<tmp> [args after --]; loss: the last "eval/loss" in metrics.jsonl
  pytorch      python benchmarks/torch_reference_shakespeare.py; loss: its final JSON line
Same interpreter, environment and cores (--threads N below the core count pins both to
the same N cores with taskset).

  python benchmarks/shakespeare_cpu.py --data_dir /path/to/data --repeats 3
  python benchmarks/shakespeare_cpu.py --skip_jax --steps 200     # torch only
  python benchmarks/shakespeare_cpu.py -- --config.train.batch_size=12  # extra JAX args
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import tempfile

import common

TORCH_SCRIPT = common.REPO / "benchmarks" / "torch_reference_shakespeare.py"
JAX_CONFIG = "configs/shakespeare_char.py:cpu"
TARGET_RATIO = 0.67  # decoder_jax wall time <= 0.67x PyTorch's, at equal or better loss


def last_json(log, key):
  """The last line of `log` that parses as JSON and has `key` (stderr shares the log)."""
  for line in reversed(pathlib.Path(log).read_text(errors="replace").splitlines()):
    try:
      row = json.loads(line)
    except ValueError:
      continue
    if isinstance(row, dict) and key in row:
      return row
  return None


def run_side(side, args, env, prefix, log_dir, tag):
  """One timed run: {side, wall, others, loss, step, evals, ...} or with "error"."""
  log = log_dir / f"{side}_{tag}.log"
  if side == "jax":
    workdir = pathlib.Path(tempfile.mkdtemp(prefix=f"shakespeare_jax_{tag}_"))
    cmd = [sys.executable, "-m", "decoder_jax.train", f"--config={JAX_CONFIG}",
           f"--workdir={workdir}"] + ([f"--config.train.num_steps={args.steps}"]
                                      if args.steps else []) + args.jax_extra
  else:
    cmd = [sys.executable, str(TORCH_SCRIPT), f"--threads={args.threads}"] + (
        [f"--steps={args.steps}"] if args.steps else []) + args.torch_arg
  done = common.run(prefix + cmd, log, env=env)
  result = {"side": side, "wall": done["wall_s"], "rc": done["returncode"],
            "others": done["others"], "log": str(log), "cmd": cmd}
  if side == "jax":
    metrics = workdir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] \
        if done["returncode"] == 0 and metrics.exists() else []
    evals = [r for r in rows if "eval/loss" in r]
    if evals:
      result.update(loss=float(evals[-1]["eval/loss"]), step=evals[-1].get("step"),
                    evals=len(evals))
    if evals and not args.keep_workdirs:
      shutil.rmtree(workdir, ignore_errors=True)
    result["workdir"] = str(workdir)
  else:
    out = last_json(log, "final_val_loss") if done["returncode"] == 0 else None
    if out:
      result.update(loss=float(out["final_val_loss"]), step=out["steps"], evals=out["evals"],
                    train_seconds=out["train_seconds"])
  if "loss" not in result:
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
    result["error"] = f"exit code {done['returncode']}; no final loss\n{tail}"
  return result


def summary(runs):
  ok = [x for x in runs if "error" not in x]
  return {"wall": common.median([x["wall"] for x in ok]), "walls": [x["wall"] for x in ok],
          "others": [x["others"] for x in ok], "loss": common.median([x["loss"] for x in ok]),
          "step": ok[-1].get("step"), "evals": ok[-1].get("evals"), "runs": len(ok)} if ok else None


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  jax_extra = argv[argv.index("--") + 1:] if "--" in argv else []
  argv = argv[:argv.index("--")] if "--" in argv else argv
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              epilog="Arguments after a lone -- go to decoder_jax.train.")
  p.add_argument("--repeats", type=int, default=1, help="runs per side (medians; the order "
                 "alternates)")
  p.add_argument("--data_dir", default=None, help="DECODER_JAX_DATA of both sides (default: "
                 "the environment's, else <repo>/../shared/data)")
  p.add_argument("--steps", type=int, default=None, help="training steps of both sides")
  p.add_argument("--threads", type=int, default=None, help="cores of each side (default all; "
                 "fewer pins both to the same cores with taskset)")
  p.add_argument("--skip_jax", action="store_true")
  p.add_argument("--skip_torch", action="store_true")
  p.add_argument("--torch_arg", action="append", default=[], help="extra torch script argument")
  p.add_argument("--loss_tolerance", type=float, default=0.0,
                 help="jax loss may exceed torch's by this and count as equal (0: strict)")
  p.add_argument("--compile_cache", choices=("cold", "warm"), default="cold",
                 help="JAX's persistent compilation cache: cold = an empty one per run; warm "
                 "= one, filled by an untimed run first")
  p.add_argument("--keep_workdirs", action="store_true")
  p.add_argument("--log_dir", default=None, help="subprocess logs (default: a fresh tmp dir)")
  p.add_argument("--json_out", default=None, help="also write results here")
  args = p.parse_args(argv)
  args.jax_extra = jax_extra
  sides = [s for s, skip in (("jax", args.skip_jax), ("torch", args.skip_torch)) if not skip]
  if not sides:
    p.error("nothing to run")
  env = {**os.environ, "DECODER_JAX_DATA": os.path.abspath(args.data_dir or common.data_dir())}
  cores = common.cores()
  args.threads = args.threads or cores
  prefix = []
  if args.threads < cores:
    if not shutil.which("taskset"):
      p.error("--threads below the core count needs taskset")
    prefix = ["taskset", "-c", f"0-{args.threads - 1}"]
  log_dir = pathlib.Path(args.log_dir or tempfile.mkdtemp(prefix="shakespeare_cpu_logs_"))
  log_dir.mkdir(parents=True, exist_ok=True)
  # The launcher keeps compiled programs in a persistent cache (decoder_jax/compile_cache.py):
  # the runs find it empty (cold) or filled (warm).
  cache_root = pathlib.Path(tempfile.mkdtemp(prefix="shakespeare_jax_compile_cache_"))
  side_env = lambda side, tag: env if side == "torch" else {  # noqa: E731
      **env, "JAX_COMPILATION_CACHE_DIR": str(cache_root if args.compile_cache == "warm"
                                              else cache_root / f"run_{tag}")}
  if "jax" in sides and args.compile_cache == "warm":
    print("[warm-up] an untimed decoder_jax run fills the compilation cache ...", flush=True)
    res = run_side("jax", args, side_env("jax", "warmup"), prefix, log_dir, "warmup")
    print(f"  warm-up FAILED: {res['error']}" if "error" in res else
          f"  warm-up: {res['wall']:.1f} s", flush=True)
  load_before, results = os.getloadavg(), {"jax": [], "torch": []}
  for r in range(args.repeats):
    for side in (sides if r % 2 == 0 else sides[::-1]):
      print(f"[repeat {r + 1}/{args.repeats}] running {side} ...", flush=True)
      res = run_side(side, args, side_env(side, r), prefix, log_dir, r)
      results[side].append(res)
      print(f"  {side} FAILED: {res['error']}" if "error" in res else
            f"  {side}: {res['wall']:.1f} s wall, final val loss {res['loss']:.4f} (step "
            f"{res.get('step')}), other processes busy {common.pct(res['others'], 0, 'n/a')} "
            "of the cores", flush=True)
  load_after = os.getloadavg()
  shutil.rmtree(cache_root, ignore_errors=True)
  s_jax, s_torch = summary(results["jax"]), summary(results["torch"])

  v = common.version
  print("\n## shakespeare-char CPU recipe: decoder_jax vs PyTorch eager\n")
  print(f"- machine: {cores} CPU cores usable ({os.cpu_count()} in the OS), "
        f"{common.cpu_name()} ({common.matmul_features()}); threads per side: "
        f"{args.threads}{' (taskset)' if prefix else ''}")
  print(f"- python {sys.version.split()[0]}, torch {v('torch')}, jax {v('jax')}, jaxlib "
        f"{v('jaxlib')}, flax {v('flax')}, optax {v('optax')}")
  print(f"- JAX compilation cache: {args.compile_cache} (" + (
      "an empty cache directory per run: every program compiles" if args.compile_cache == "cold"
      else "filled by an untimed run before the timed ones") + ")")
  print(f"- DECODER_JAX_DATA={env['DECODER_JAX_DATA']}; XLA_FLAGS={env.get('XLA_FLAGS', '(unset)')}")
  print(f"- load average (1 min) before / after: {load_before[0]:.2f} / {load_after[0]:.2f}; "
        "'others busy' = share of all cores used by processes other than the timed one while "
        "it ran (contention if well above 0%)")
  print(f"- repeats: {args.repeats} (median quoted; order alternates); logs in {log_dir}")
  print("- wall seconds are whole processes: interpreter start, imports, data loading, "
        "compilation, training and evaluation\n")
  rows = [[name, "n/a", "", "n/a"] if s is None else
          [name, f"{s['wall']:.1f}", ", ".join(f"{w:.1f}" for w in s["walls"]),
           f"{s['loss']:.4f}", s["step"] if s["step"] is not None else "n/a",
           s["evals"] if s["evals"] is not None else "n/a",
           ", ".join(common.pct(o, 0, "n/a") for o in s["others"])]
          for name, s in (("decoder_jax", s_jax), (" ".join(["pytorch eager"] + args.torch_arg),
                                                   s_torch))]
  print("\n".join(common.md_table(["side", "wall s (median)", "all runs, s", "final val loss",
                                   "steps", "evals", "others busy"], rows, right=(1, 3, 4, 5))))
  verdict = None
  if s_jax and s_torch:
    ratio, dloss = s_jax["wall"] / s_torch["wall"], s_jax["loss"] - s_torch["loss"]
    verdict = "MET" if ratio <= TARGET_RATIO and dloss <= args.loss_tolerance else "NOT MET"
    print(f"\njax_wall / torch_wall = **{ratio:.3f}** (target <= {TARGET_RATIO} at equal or "
          f"better loss); loss jax - torch = {dloss:+.4f} (tolerance {args.loss_tolerance}) -> "
          f"target {verdict}")
  else:
    print("\njax_wall / torch_wall = n/a (a side was skipped or failed; target "
          f"<= {TARGET_RATIO} at equal or better loss)")
  if args.json_out:
    with open(args.json_out, "w") as f:
      json.dump({**results, "summary": {"jax": s_jax, "torch": s_torch, "verdict": verdict},
                 "cores": cores, "threads": args.threads, "compile_cache": args.compile_cache},
                f, indent=1)
  return 1 if any("error" in x for side in sides for x in results[side]) else 0


if __name__ == "__main__":
  sys.exit(main())
