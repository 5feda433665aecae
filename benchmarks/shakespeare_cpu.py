"""Side-by-side CPU benchmark: decoder_jax vs. a PyTorch eager reference.

Both sides train the shakespeare-char CPU recipe, each timed as a whole subprocess by wall
clock. See benchmarks/README.md.

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
import statistics
import sys
import tempfile

import common

TORCH_SCRIPT = common.REPO / "benchmarks" / "torch_reference_shakespeare.py"
JAX_CONFIG = "configs/shakespeare_char.py:cpu"
TARGET_RATIO = 0.67  # decoder_jax wall time <= 0.67x PyTorch's, at equal or better loss


def run_side(side, args, env, prefix, log_dir, tag):
  """One timed run: {side, wall, others, loss, step, evals, ...} or with "error"."""
  log, steps = log_dir / f"{side}_{tag}.log", [args.steps] if args.steps else []
  if side == "jax":
    workdir = pathlib.Path(tempfile.mkdtemp(prefix=f"shakespeare_jax_{tag}_"))
    cmd = [sys.executable, "-m", "decoder_jax.train", f"--config={JAX_CONFIG}",
           f"--workdir={workdir}", *(f"--config.train.num_steps={n}" for n in steps),
           *args.jax_extra]
  else:
    cmd = [sys.executable, str(TORCH_SCRIPT), f"--threads={args.threads}",
           *(f"--steps={n}" for n in steps), *args.torch_arg]
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
      if not args.keep_workdirs:
        shutil.rmtree(workdir, ignore_errors=True)
    result["workdir"] = str(workdir)
  elif done["returncode"] == 0:  # the last JSON line with final_val_loss (stderr shares the log)
    for line in reversed(log.read_text(errors="replace").splitlines()):
      try:
        out = json.loads(line)
      except ValueError:
        continue
      if isinstance(out, dict) and "final_val_loss" in out:
        result.update(loss=float(out["final_val_loss"]), step=out["steps"], evals=out["evals"],
                      train_seconds=out["train_seconds"])
        break
  if "loss" not in result:
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
    result["error"] = f"exit code {done['returncode']}; no final loss\n{tail}"
  return result


def summary(runs):
  ok = [x for x in runs if "error" not in x]
  return {"wall": statistics.median([x["wall"] for x in ok]), "walls": [x["wall"] for x in ok],
          "others": [x["others"] for x in ok], "loss": statistics.median([x["loss"] for x in ok]),
          "step": ok[-1].get("step"), "evals": ok[-1].get("evals"), "runs": len(ok)} if ok else None


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  jax_extra = argv[argv.index("--") + 1:] if "--" in argv else []
  argv = argv[:argv.index("--")] if "--" in argv else argv
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              epilog="Arguments after a lone -- go to decoder_jax.train.")
  add = p.add_argument
  add("--repeats", type=int, default=1, help="runs per side (medians; the order alternates)")
  add("--data_dir", default=None, help="DECODER_JAX_DATA of both sides (default: the "
      "environment's, else <repo>/../shared/data)")
  add("--steps", type=int, default=None, help="training steps of both sides")
  add("--threads", type=int, default=None,
      help="cores of each side (default all; fewer pins both to the same cores with taskset)")
  add("--skip_jax", action="store_true")
  add("--skip_torch", action="store_true")
  add("--torch_arg", action="append", default=[], help="extra torch script argument")
  add("--loss_tolerance", type=float, default=0.0,
      help="jax loss may exceed torch's by this and count as equal (0: strict)")
  add("--compile_cache", choices=("cold", "warm"), default="cold", help="JAX's persistent "
      "compilation cache: an empty one per run, or one filled by an untimed run first")
  add("--keep_workdirs", action="store_true")
  add("--log_dir", default=None, help="subprocess logs (default: a fresh tmp dir)")
  add("--json_out", default=None)
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
  # The launcher's persistent compilation cache (decoder_jax/compile_cache.py): cold or warm.
  cache_root = pathlib.Path(tempfile.mkdtemp(prefix="shakespeare_jax_compile_cache_"))
  side_env = lambda side, tag: env if side == "torch" else {  # noqa: E731
      **env, "JAX_COMPILATION_CACHE_DIR": str(cache_root if args.compile_cache == "warm"
                                              else cache_root / f"run_{tag}")}

  def report(side, res):
    print(f"  {side} FAILED: {res['error']}" if "error" in res else
          f"  {side}: {res['wall']:.1f} s wall, final val loss {res['loss']:.4f} (step "
          f"{res.get('step')}), other processes busy {common.pct(res['others'], 0, 'n/a')} of "
          "the cores", flush=True)
  if "jax" in sides and args.compile_cache == "warm":
    print("[warm-up] an untimed decoder_jax run fills the compilation cache ...", flush=True)
    report("warm-up", run_side("jax", args, side_env("jax", "warmup"), prefix, log_dir, "warmup"))
  load_before, results = os.getloadavg(), {"jax": [], "torch": []}
  for r in range(args.repeats):
    for side in (sides if r % 2 == 0 else sides[::-1]):
      print(f"[repeat {r + 1}/{args.repeats}] running {side} ...", flush=True)
      results[side].append(run_side(side, args, side_env(side, r), prefix, log_dir, r))
      report(side, results[side][-1])
  load_after = os.getloadavg()
  shutil.rmtree(cache_root, ignore_errors=True)
  s_jax, s_torch = summary(results["jax"]), summary(results["torch"])

  v, flags = common.version, (common.proc_field("/proc/cpuinfo", "flags") or "").split()
  wanted = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2")  # XLA's bf16 dot speed
  matmul = ", ".join(f for f in wanted if f in flags) or "none of " + "/".join(wanted)
  print("\n## shakespeare-char CPU recipe: decoder_jax vs PyTorch eager\n")
  print(f"- machine: {cores} CPU cores usable ({os.cpu_count()} in the OS), "
        f"{common.cpu_name()} ({matmul}); threads per side: "
        f"{args.threads}{' (taskset)' if prefix else ''}")
  print(f"- python {sys.version.split()[0]}, torch {v('torch')}, jax {v('jax')}, jaxlib "
        f"{v('jaxlib')}, flax {v('flax')}, optax {v('optax')}")
  print(f"- JAX compilation cache: {args.compile_cache} (" + (
      "an empty cache directory per run: every program compiles" if args.compile_cache == "cold"
      else "filled by an untimed run before the timed ones") + ")")
  print(f"- DECODER_JAX_DATA={env['DECODER_JAX_DATA']}; XLA_FLAGS={env.get('XLA_FLAGS', '(unset)')}")
  print(f"- load average (1 min) before / after: {load_before[0]:.2f} / {load_after[0]:.2f}")
  print(f"- repeats: {args.repeats} (median quoted; order alternates); logs in {log_dir}\n")
  na = lambda x: "n/a" if x is None else x  # noqa: E731
  rows = [[name, "n/a", "", "n/a"] if s is None else
          [name, f"{s['wall']:.1f}", ", ".join(f"{w:.1f}" for w in s["walls"]),
           f"{s['loss']:.4f}", na(s["step"]), na(s["evals"]),
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
    common.dump(args.json_out, {**results, "summary": {"jax": s_jax, "torch": s_torch,
                                                       "verdict": verdict},
                                "cores": cores, "threads": args.threads,
                                "compile_cache": args.compile_cache}, say=False)
  return 1 if any("error" in x for side in sides for x in results[side]) else 0

if __name__ == "__main__":
  sys.exit(main())
