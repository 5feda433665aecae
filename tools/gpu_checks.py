"""Issue 6's GPU checks as one prepared run, for an offline GPU machine lent for minutes.

Two steps:

  # 1. Here, with package-index access: a kit folder with wheels for what the GPU machine
  #    lacks (decoder_jax's dependencies not in HAVE: one distribution name per line, e.g.
  #    from `pip list` there) at the versions installed here, and the shakespeare text.
  python tools/gpu_checks.py prepare --kit .kit --have /tmp/gpu_packages.txt \\
      --data_dir /work/shared/data

  # 2. There (no network), from the repository root, carrying .kit:
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .kit/wheels/*.whl && \\
  PYTHONPATH=/tmp/site:$PWD python3 tools/gpu_checks.py run --kit .kit --out $OUT

`run` works through the stages in order of importance, each in its own processes with a time
cap, within one overall budget (--budget_s; a stage that would not fit is skipped and named
so that a second call with --stages can finish it), and ends with one table: every
acceptance point with its measured value, target and verdict. It writes to --out:
report.md (the section to append to benchmarks/RESULTS.md), results.json, logs.tar.gz (every
stage's log and JSON) and traces.tar.gz (the profiler traces, when under 16 MiB).

Stages (default order; caps in seconds):
  speed      train_speed.py --models gpt2,smollm2 with --trace_dir      (280)
  bf16_f32   the shakespeare-char GPU recipe twice, bfloat16 and float32, side by side on the
             GPU; final and best eval/loss from each run's metrics.jsonl (150)
  llama1b    train_speed.py --models llama1b with --trace_dir           (200)
  max_batch  train_speed.py --models none --max_batch_search --loss_chunk 8192 (240)
  flags      train_speed.py --models gpt2,smollm2 --sides jax --no_launch_flags; against
             the speed stage's decoder_jax rows: the launch XLA flags' effect (120)

--smoke runs every stage on tiny shapes (CPU-sized), to check the plumbing anywhere.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import importlib.metadata as metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCHMARKS)
# pylint: disable=wrong-import-position
import common  # benchmarks/common.py: the subprocess runner
# The speed, MFU and nanoGPT figures are train_speed.py's, the one place they are set.
from train_speed import MFU_TARGET, NANOGPT_TOK_S, SPEED_TARGETS
from decoder_jax import trace_account
from packaging.utils import canonicalize_name
# pylint: enable=wrong-import-position

TRAIN_SPEED = os.path.join(BENCHMARKS, "train_speed.py")
SHAKESPEARE_CONFIG = os.path.join(ROOT, "configs", "shakespeare_char.py")
CORPUS = "tiny_shakespeare"
MAX_RETURNED_BYTES = 16 << 20  # the largest file the device tool brings back


BF16_TOLERANCE = 0.02  # |eval/loss bf16 - float32|, shakespeare GPU recipe

SMOKE_SPEED = ["--num_layers", "1", "--batch", "2", "--seq_len", "32", "--steps", "2",
               "--warmup", "1"]
SMOKE_SEARCH = ["--force_search", "--search_start", "1", "--search_cap", "2", "--num_layers",
                "1", "--seq_len", "32"]
SMOKE_RECIPE = ["--config.train.num_steps=20", "--config.model.num_layers=1",
                "--config.train.batch_size=4", "--config.train.eval_every=10",
                "--config.train.log_every=10"]


def missing_distributions(root: str, have) -> dict[str, str]:
  """{name: version installed here} for `root`'s install requirements, recursively, that the
  GPU machine lacks. `have`: {normalised name: version or None}; a known version outside a
  requirement's range counts as lacking (the wheel then shadows it). Extras and markers
  that do not apply are skipped."""
  from packaging.requirements import Requirement
  have = dict.fromkeys(have) if isinstance(have, (set, frozenset)) else dict(have)
  need, todo, seen = {}, [root], set()
  while todo:
    name = todo.pop()
    if name in seen:
      continue
    seen.add(name)
    for text in metadata.requires(name) or []:
      req = Requirement(text)
      if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
      dep = canonicalize_name(req.name)
      if dep in need:
        continue
      if dep in have and (have[dep] is None or req.specifier.contains(have[dep],
                                                                      prereleases=True)):
        continue
      need[dep] = metadata.version(dep)
      todo.append(dep)
  return need


def read_have(path: str) -> dict:
  """{normalised name: version or None} from `pip list` / `pip freeze` output or bare names."""
  have = {}
  for line in open(path):
    line = line.strip()
    if not line or line.startswith(("#", "Package", "---")):
      continue
    if "==" in line:
      name, version = line.split("==", 1)
    else:
      name, *rest = line.split()
      version = rest[0] if rest else None
    have[canonicalize_name(name)] = version
  return have


def prepare(args):
  have = read_have(args.have)
  if not have:
    raise SystemExit(f"{args.have}: no package names")
  need = missing_distributions("decoder_jax", have)
  wheels = os.path.join(args.kit, "wheels")
  shutil.rmtree(wheels, ignore_errors=True)
  os.makedirs(wheels)
  platforms = [f"--platform=manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34)]
  platforms += ["--platform=manylinux2014_x86_64", "--platform=manylinux1_x86_64"]
  print(f"{len(need)} distributions the GPU machine lacks: "
        f"{', '.join(f'{k}=={v}' for k, v in sorted(need.items()))}")
  for name, version in sorted(need.items()):
    spec = f"{name}=={version}"
    got = subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
         f"--python-version={args.python_version}", "--implementation=cp", *platforms,
         "-d", wheels, spec], capture_output=True, text=True)
    if got.returncode != 0:  # an sdist only (pure Python, e.g. promise): build its wheel here
      built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                              "-w", wheels, spec], capture_output=True, text=True)
      if built.returncode != 0:
        raise SystemExit(f"no wheel for {spec}:\n{got.stderr[-800:]}\n{built.stderr[-800:]}")
  corpus = os.path.join(args.data_dir, CORPUS)
  if not os.path.isdir(corpus):
    raise SystemExit(f"{corpus}: not found (--data_dir: the folder holding {CORPUS}/)")
  target = os.path.join(args.kit, "data", CORPUS)
  shutil.rmtree(target, ignore_errors=True)
  shutil.copytree(corpus, target, ignore=shutil.ignore_patterns("*_prepared*", ".*"))
  size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(args.kit) for f in fs)
  print(f"kit {args.kit}: {len(os.listdir(wheels))} wheels and {CORPUS}, "
        f"{size / 2**20:.1f} MiB in all")


@dataclasses.dataclass
class StageResult:
  name: str
  status: str  # "ok", "failed (exit N)", "killed at N s", "skipped (...)"
  seconds: float = 0.0
  data: dict = dataclasses.field(default_factory=dict)


class Budget:
  def __init__(self, seconds):
    self.end = time.time() + seconds

  def left(self):
    return self.end - time.time()


def _load(path):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def stage_train_speed(name, extra, args, budget, cap):
  timeout = min(cap, budget.left())
  json_out = os.path.join(args.work, f"{name}.json")
  cmd = [sys.executable, TRAIN_SPEED, *extra, "--json_out", json_out,
         "--time_limit_s", f"{max(timeout - 15, 30):.0f}"]
  if args.smoke:
    cmd += SMOKE_SPEED if "--max_batch_search" not in extra else SMOKE_SEARCH
  # On SIGTERM at the cap, train_speed.py ends its own child (a session of its own) too.
  status = common.run(cmd, os.path.join(args.work, f"{name}.log"), timeout=timeout + 10,
                      cwd=ROOT)["status"]
  return status, _load(json_out)


def recipe_losses(workdir):
  """(final, best) eval/loss from a training run's metrics.jsonl (None where absent)."""
  losses = []
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      for line in f:
        row = json.loads(line)
        if "eval/loss" in row:
          losses.append((row["step"], row["eval/loss"]))
  except OSError:
    return None, None, 0
  if not losses:
    return None, None, 0
  return losses[-1][1], min(l for _, l in losses), losses[-1][0]


def stage_bf16_f32(args, budget, cap):
  """The GPU recipe in bfloat16 (as configured) and float32, at once on one GPU."""
  timeout = min(cap, budget.left())
  data_dir = os.path.join(os.path.abspath(args.kit), "data")
  env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION="0.4")  # two processes, one GPU
  runs = {dtype: {"workdir": os.path.join(tempfile.mkdtemp(prefix=f"shakespeare_{dtype}_"), "w")}
          for dtype in ("bfloat16", "float32")}

  def train(dtype):
    cmd = [sys.executable, "-m", "decoder_jax.train", f"--config={SHAKESPEARE_CONFIG}",
           f"--workdir={runs[dtype]['workdir']}", f"--config.data.local_dir={data_dir}",
           f"--config.model.dtype={dtype}"] + (SMOKE_RECIPE if args.smoke else [])
    return common.run(cmd, os.path.join(args.work, f"bf16_f32_{dtype}.log"), env=env,
                      timeout=timeout, cwd=ROOT)["status"]

  with concurrent.futures.ThreadPoolExecutor(len(runs)) as pool:
    statuses = dict(zip(runs, pool.map(train, runs)))
  for r in runs.values():
    r.update(zip(("final", "best", "last_eval_step"), recipe_losses(r["workdir"])))
  bad = [f"{dtype} {status}" for dtype, status in statuses.items() if status != "ok"]
  return ("; ".join(bad) if bad else "ok"), runs


def run(args):
  stages = [s for s in args.stages.split(",") if s]
  unknown = set(stages) - set(STAGES)
  if unknown:
    raise SystemExit(f"unknown stages {sorted(unknown)}; choose from {list(STAGES)}")
  if not os.path.isdir(os.path.join(args.kit, "data", CORPUS)) and "bf16_f32" in stages:
    raise SystemExit(f"{args.kit}/data/{CORPUS} is missing: make the kit with "
                     "`gpu_checks.py prepare` and carry it")
  os.makedirs(args.out, exist_ok=True)
  args.work = tempfile.mkdtemp(prefix="gpu_checks_")
  budget = Budget(args.budget_s)
  trace_dir = os.path.join(args.work, "traces")
  results = {}
  print(f"# GPU checks: stages {', '.join(stages)}; budget {args.budget_s:.0f} s"
        f"{' (smoke shapes)' if args.smoke else ''}", flush=True)
  for name in stages:
    cap = STAGES[name]
    if budget.left() < min(cap, 60):
      results[name] = StageResult(name, f"skipped (budget: {budget.left():.0f} s left)")
      print(f"## {name}: {results[name].status}", flush=True)
      continue
    print(f"## {name} (cap {min(cap, budget.left()):.0f} s)", flush=True)
    t0 = time.time()
    if name == "speed":
      status, data = stage_train_speed(name, ["--models", "gpt2,smollm2", "--trace_dir",
                                              trace_dir], args, budget, cap)
    elif name == "llama1b":
      status, data = stage_train_speed(name, ["--models", "llama1b", "--trace_dir", trace_dir],
                                       args, budget, cap)
    elif name == "max_batch":
      status, data = stage_train_speed(name, ["--models", "none", "--max_batch_search",
                                              "--loss_chunk", "8192"], args, budget, cap)
    elif name == "flags":
      status, data = stage_train_speed(name, ["--models", "gpt2,smollm2", "--sides", "jax",
                                              "--no_launch_flags"], args, budget, cap)
    else:
      status, data = stage_bf16_f32(args, budget, cap)
    results[name] = StageResult(name, status, time.time() - t0, data or {})
    print(f"   {status} in {results[name].seconds:.0f} s", flush=True)

  why_not = "smoke shapes" if args.smoke else (None if gpu_present() else "not a GPU run")
  rows = acceptance_rows(results, why_not)
  env = next((r.data.get("env") for r in results.values() if r.data.get("env")), {})
  report = report_text(rows, results, env, args)
  with open(os.path.join(args.out, "report.md"), "w") as f:
    f.write(report + "\n")
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump({"env": env, "rows": rows, "stages": {k: dataclasses.asdict(v)
                                                     for k, v in results.items()}},
              f, indent=1, default=str)
  _bundle(args.work, os.path.join(args.out, "logs.tar.gz"), exclude="traces")
  if os.path.isdir(trace_dir):
    path = os.path.join(args.out, "traces.tar.gz")
    _bundle(trace_dir, path)
    if os.path.getsize(path) > MAX_RETURNED_BYTES:
      os.remove(path)
      print(f"traces over {MAX_RETURNED_BYTES >> 20} MiB: not kept (the accounts are in the "
            "logs)")
  print("\n" + report)
  return 0


def _bundle(folder, path, exclude=None):
  with tarfile.open(path, "w:gz") as tar:
    for entry in sorted(os.listdir(folder)):
      if entry != exclude:
        tar.add(os.path.join(folder, entry), arcname=entry)


def _side(data, model, side):
  r = (data.get("models", {}).get(model, {}).get("by_side", {}) or {}).get(side)
  return r if r and "error" not in r else None


def gpu_present() -> bool:
  try:
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=30).returncode == 0
  except (OSError, subprocess.TimeoutExpired):
    return False


def acceptance_rows(results, why_not_valid=None):
  """[check, measured, target, verdict] for each acceptance point, plus informational rows.
  why_not_valid: set when the run cannot decide the H200 targets (no GPU, smoke shapes)."""
  rows = []

  def verdict(met):
    word = "met" if met else "NOT met"
    return f"n/a: {why_not_valid} (would read: {word})" if why_not_valid else word
  speed = results.get("speed", StageResult("speed", "not run")).data
  for model, target in SPEED_TARGETS.items():
    j, h = _side(speed, model, "jax"), _side(speed, model, "hf")
    if j and h:
      ratio = j["tok_per_s"] / h["tok_per_s"]
      rows.append([f"{model}: decoder_jax / HF tokens/s",
                   f"{ratio:.2f}x ({j['tok_per_s']:,.0f} vs {h['tok_per_s']:,.0f})",
                   f">= {target}x", verdict(ratio >= target)])
    else:
      rows.append([f"{model}: decoder_jax / HF tokens/s", "not measured", f">= {target}x",
                   results.get("speed", StageResult("", "not run")).status])
  j = _side(speed, "gpt2", "jax")
  if j:
    rows.append(["gpt2: decoder_jax vs nanoGPT's published H200 figure",
                 f"{j['tok_per_s'] / NANOGPT_TOK_S:.2f}x of {NANOGPT_TOK_S:,.0f}", "(info)", ""])
  llama = results.get("llama1b", StageResult("llama1b", "not run"))
  mfu_target = MFU_TARGET["llama1b"]
  j = _side(llama.data, "llama1b", "jax")
  if j and j.get("mfu") is not None:
    rows.append(["llama1b: decoder_jax MFU", f"{j['mfu']:.1%} of the measured peak",
                 f">= {mfu_target:.0%}", verdict(j["mfu"] >= mfu_target)])
  else:
    rows.append(["llama1b: decoder_jax MFU", "not measured", f">= {mfu_target:.0%}",
                 llama.status])
  bf = results.get("bf16_f32", StageResult("bf16_f32", "not run"))
  b, f = bf.data.get("bfloat16", {}), bf.data.get("float32", {})
  if b.get("final") is not None and f.get("final") is not None:
    diff = abs(b["final"] - f["final"])
    same_step = b["last_eval_step"] == f["last_eval_step"]
    rows.append(["shakespeare GPU recipe: |eval/loss bf16 - float32|",
                 f"{diff:.4f} (final at step {b['last_eval_step']}: {b['final']:.4f} vs "
                 f"{f['final']:.4f}; best {b['best']:.4f} vs {f['best']:.4f})",
                 f"<= {BF16_TOLERANCE}", verdict(diff <= BF16_TOLERANCE)
                 if same_step and bf.status == "ok" else f"incomplete ({bf.status})"])
  else:
    rows.append(["shakespeare GPU recipe: |eval/loss bf16 - float32|", "not measured",
                 f"<= {BF16_TOLERANCE}", bf.status])
  mb = results.get("max_batch", StageResult("max_batch", "not run"))
  s = mb.data.get("searches", {}).get("gpt2", {})
  jm, hm = (s.get("jax") or {}).get("max"), (s.get("hf") or {}).get("max")
  if jm and hm:
    capped = (s.get("hf") or {}).get("capped")
    rows.append(["gpt2 seq 1024: largest batch that trains, decoder_jax vs HF",
                 f"{jm} vs {hm} ({jm / hm:.2f}x, {jm - hm:+d})", "decoder_jax larger",
                 verdict(jm > hm and not capped)])
  else:
    rows.append(["gpt2 seq 1024: largest batch that trains, decoder_jax vs HF", "not measured",
                 "decoder_jax larger", mb.status])
  flags = results.get("flags", StageResult("flags", "not run"))
  for model in SPEED_TARGETS:
    on, off = _side(speed, model, "jax"), _side(flags.data, model, "jax")
    if on and off:
      rows.append([f"{model}: launch XLA flags on / off (decoder_jax tokens/s)",
                   f"{on['tok_per_s'] / off['tok_per_s']:.3f}x", "(info)", ""])
  for stage in ("speed", "llama1b"):
    for model, m in results.get(stage, StageResult("", "")).data.get("models", {}).items():
      j = _side({"models": {model: m}}, model, "jax")
      if j and j.get("trace_ms_per_step"):
        rows.append([f"{model}: decoder_jax step by kind of work ({j.get('trace_kind')} trace)",
                     trace_account.split_text(j["trace_ms_per_step"]), "(info)", ""])
  return rows


def report_text(rows, results, env, args):
  when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
  lines = [f"## Issue 6 GPU checks ({when} UTC{', smoke shapes' if args.smoke else ''})", "",
           "`python tools/gpu_checks.py run " + " ".join(sys.argv[2:]) + "`", ""]
  if env:
    lines.append("Hardware: " + ", ".join(str(env.get(k)) for k in ("jax_device", "cpu")
                                         if env.get(k)) +
                 ". Versions: " + ", ".join(f"{k} {env[k]}" for k in ("jax", "jaxlib", "flax",
                                                                      "torch", "transformers")
                                            if env.get(k)) + ".")
    lines.append("")
  lines += ["| stage | status | seconds |", "|---|---|---:|"]
  lines += [f"| {r.name} | {r.status} | {r.seconds:.0f} |" for r in results.values()]
  lines += ["", "| check | measured | target | verdict |", "|---|---|---|---|"]
  lines += [f"| {' | '.join(str(c) for c in row)} |" for row in rows]
  for name in ("speed", "llama1b", "max_batch", "flags"):
    summary = results.get(name, StageResult("", "")).data.get("summary")
    if summary:
      lines += ["", f"train_speed summary ({name}):", ""] + summary
  return "\n".join(lines)


# Stage -> time cap (s), in the default order: the acceptance points first, cheapest and
# most decisive ahead; the flags' before/after (information) last.
STAGES = {"speed": 280, "bf16_f32": 150, "llama1b": 200, "max_batch": 240, "flags": 120}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  sub = ap.add_subparsers(dest="command", required=True)
  p = sub.add_parser("prepare", help="build the kit (here, with package-index access)")
  p.add_argument("--kit", required=True, help="folder to write: wheels/ and data/")
  p.add_argument("--have", required=True, help="file of the distributions the GPU machine "
                 "has, one per line: names, or `pip list` / `pip freeze` output (versions "
                 "outside decoder_jax's ranges are carried too)")
  p.add_argument("--data_dir", default=os.environ.get("DECODER_JAX_DATA"),
                 help=f"folder holding {CORPUS}/ (default $DECODER_JAX_DATA)")
  p.add_argument("--python_version", default="3.12", help="the GPU machine's Python")
  r = sub.add_parser("run", help="run the checks (there)")
  r.add_argument("--kit", required=True)
  r.add_argument("--out", required=True, help="folder for report.md, results.json, tarballs")
  r.add_argument("--budget_s", type=float, default=560)
  r.add_argument("--stages", default=",".join(STAGES))
  r.add_argument("--smoke", action="store_true", help="tiny shapes: check the plumbing")
  args = ap.parse_args(argv)
  if args.command == "prepare":
    if not args.data_dir:
      ap.error("--data_dir (or DECODER_JAX_DATA) is needed")
    return prepare(args)
  return run(args)


if __name__ == "__main__":
  sys.exit(main())
