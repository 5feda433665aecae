"""The fine-tuning methods side by side on the 2-core CPU recipes: one markdown table.

Per task and method: `python -m decoder_jax.train --config=configs/smollm2_<task>.py:<method>,cpu`
(skipped when <root>/<task>_<method>.train.json exists), then `python -m decoder_jax.evaluate`
on the run's best checkpoint. See benchmarks/README.md.

  python benchmarks/peft_cpu.py --data_dir ../shared/data --root /tmp/peft \\
      --tasks sst2 --methods zero-shot,full,lora,adalora,adapter,prompt,prefix
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import common

METHODS = ("zero-shot", "full", "lora", "adalora", "adapter", "prompt", "prefix")
TASKS = ("sst2", "multi30k", "chat")


def read(path, default=None):
  if not os.path.exists(path):
    return default
  with open(path, errors="replace") as f:
    return f.read()


def run_one(task, method, args, env) -> dict:
  config = f"configs/smollm2_{task}.py:{'lora' if method == 'zero-shot' else method},cpu"
  name = f"{task}_{method}"
  workdir, row = os.path.join(args.root, name), {"task": task, "method": method}
  if method != "zero-shot":
    train_log = os.path.join(args.root, f"{name}.train.log")
    timing_file = os.path.join(args.root, f"{name}.train.json")
    timing = json.loads(read(timing_file, "null"))  # wall_s, peak_rss_mib (the child's), ...
    if timing is None:
      timing = common.run([sys.executable, "-m", "decoder_jax.train", f"--config={config}",
                           f"--workdir={workdir}"], train_log, env=env)
      if timing["returncode"] == 0:
        with open(timing_file, "w") as f:
          json.dump(timing, f)
    steps = [json.loads(line)["step"] for line in
             read(os.path.join(workdir, "metrics.jsonl"), "").splitlines() if line.strip()]
    # (trainable, total) parameters from the loop's "model: ..." line
    found = re.findall(r"([\d.]+)M parameters, ([\d.]+)M trainable", read(train_log, ""))
    row.update(timing, steps=max(steps) if steps else None,
               params=(float(found[-1][1]) * 1e6, float(found[-1][0]) * 1e6) if found else None)
    if timing["returncode"] != 0:
      return row
  evaluate = [sys.executable, "-m", "decoder_jax.evaluate", f"--config={config}"]
  evaluate += ["--zero_shot"] if method == "zero-shot" else [f"--workdir={workdir}"]
  evaluate += ([f"--tsv_file={args.tsv_file or os.path.join(args.data_dir, 'sst2', 'dev.tsv')}"]
               if task == "sst2" else ["--split=test_2016_flickr",
                                       f"--max_examples={args.bleu_examples}"]
               if task == "multi30k" else ["--split=test"])
  eval_log = os.path.join(args.root, f"{name}.eval.log")
  row["eval_wall_s"] = common.run(evaluate, eval_log, env=env)["wall_s"]
  lines = [line for line in read(eval_log, "").splitlines() if line.startswith("{")]
  row["eval"] = json.loads(lines[-1]) if lines else None
  return row


def metric(row) -> str:
  result = row.get("eval")
  if not result:
    return "failed"
  if "accuracy" in result:
    return f"{100 * result['accuracy']:.2f}%"
  return f"{result['bleu']:.2f}" if "bleu" in result else f"{result['perplexity']:.2f}"


def table(rows) -> str:
  cells = []
  for row in rows:
    params, trained = row.get("params"), "wall_s" in row
    cells.append([row["task"], row["method"], metric(row),
                  f"{params[0] / 1e6:.3f}M ({100 * params[0] / params[1]:.2f}%)" if params
                  else "0", row.get("steps") or "-",
                  f"{row['wall_s']:.0f}" if trained else "-",
                  f"{row['peak_rss_mib']:.0f}" if trained else "-",
                  f"{row.get('eval_wall_s', 0):.0f}", (row.get("eval") or {}).get("weights", "-")])
  return "\n".join(common.md_table(
      ["task", "method", "metric", "trainable (share)", "steps", "train wall s",
       "peak host MiB", "eval wall s", "weights scored"], cells, right=range(2, 8)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", required=True, help="folder holding sst2/ and multi30k/")
  parser.add_argument("--root", required=True, help="workdirs and logs go here")
  parser.add_argument("--tasks", default="sst2,multi30k")
  parser.add_argument("--methods", default=",".join(METHODS))
  parser.add_argument("--bleu_examples", type=int, default=200)
  parser.add_argument("--tsv_file", default=None, help="SST-2: score this TSV (default dev)")
  args = parser.parse_args()
  tasks, methods = args.tasks.split(","), args.methods.split(",")
  for name, given, known in (("task", tasks, TASKS), ("method", methods, METHODS)):
    unknown = [g for g in given if g not in known]
    if unknown:
      parser.error(f"unknown {name}(s) {unknown}; known: {list(known)}")
  os.makedirs(args.root, exist_ok=True)
  env = {**os.environ, "DECODER_JAX_DATA": os.path.abspath(args.data_dir),
         "DECODER_JAX_PROGRESS": "line"}
  rows = []
  for task in tasks:
    for method in methods:
      rows.append(run_one(task, method, args, env))
      print(f"{task} {method}: {metric(rows[-1])}", file=sys.stderr, flush=True)
  with open(os.path.join(args.root, "rows.json"), "w") as f:
    json.dump(rows, f, indent=1)
  print(table(rows))

if __name__ == "__main__":
  main()
