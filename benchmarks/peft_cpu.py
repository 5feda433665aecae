"""The fine-tuning methods side by side on the 2-core CPU recipes: one markdown table.

For each task and method this runs `python -m decoder_jax.train
--config=configs/smollm2_<task>.py:<method>,cpu` (skipped when the workdir already holds
a finished run, so an interrupted sweep continues) and then `python -m
decoder_jax.evaluate` on the run's best checkpoint: SST-2 accuracy on a TSV file (dev by
default), Multi30k greedy BLEU on test_2016_flickr (its first --bleu_examples sentences),
chat perplexity on the test split. `zero-shot` evaluates the pretrained model alone.
Training is timed as a whole process (wall clock) with its peak resident memory
(getrusage of the child); trainable parameters come from the run's log.

  python benchmarks/peft_cpu.py --data_dir ../shared/data --root /tmp/peft \
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


def eval_args(task: str, data_dir: str, bleu_examples: int, tsv_file: str | None):
  if task == "sst2":
    return [f"--tsv_file={tsv_file or os.path.join(data_dir, 'sst2', 'dev.tsv')}"]
  if task == "multi30k":
    return ["--split=test_2016_flickr", f"--max_examples={bleu_examples}"]
  return ["--split=test"]


def trainable_from_log(log_path: str):
  """(trainable, total) parameters from the loop's "model: ..." line, or None."""
  if not os.path.exists(log_path):
    return None
  with open(log_path, errors="replace") as f:
    found = re.findall(r"([\d.]+)M parameters, ([\d.]+)M trainable", f.read())
  return (float(found[-1][1]) * 1e6, float(found[-1][0]) * 1e6) if found else None


def last_step(workdir: str) -> int | None:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    steps = [json.loads(line)["step"] for line in f if line.strip()]
  return max(steps) if steps else None


def run_one(task, method, args, env) -> dict:
  config = f"configs/smollm2_{task}.py:{'lora' if method == 'zero-shot' else method},cpu"
  name = f"{task}_{method}"
  workdir, row = os.path.join(args.root, name), {"task": task, "method": method}
  python = sys.executable
  if method != "zero-shot":
    train_log = os.path.join(args.root, f"{name}.train.log")
    timing_file = os.path.join(args.root, f"{name}.train.json")
    if not os.path.exists(timing_file):  # wall_s, peak_rss_mib (the child's), returncode
      timing = common.run([python, "-m", "decoder_jax.train", f"--config={config}",
                           f"--workdir={workdir}"], train_log, env=env)
      if timing["returncode"] == 0:
        with open(timing_file, "w") as f:
          json.dump(timing, f)
    else:
      with open(timing_file) as f:
        timing = json.load(f)
    row.update(timing, steps=last_step(workdir), params=trainable_from_log(train_log))
    if timing["returncode"] != 0:
      return row
  evaluate = [python, "-m", "decoder_jax.evaluate", f"--config={config}"]
  evaluate += ["--zero_shot"] if method == "zero-shot" else [f"--workdir={workdir}"]
  eval_log = os.path.join(args.root, f"{name}.eval.log")
  eval_timing = common.run(evaluate + eval_args(task, args.data_dir, args.bleu_examples,
                                                args.tsv_file), eval_log, env=env)
  with open(eval_log, errors="replace") as f:
    lines = [line for line in f if line.startswith("{")]
  row["eval"] = json.loads(lines[-1]) if lines else None
  row["eval_wall_s"] = eval_timing["wall_s"]
  return row


def metric(row) -> str:
  result = row.get("eval")
  if not result:
    return "failed"
  if "accuracy" in result:
    return f"{100 * result['accuracy']:.2f}%"
  if "bleu" in result:
    return f"{result['bleu']:.2f}"
  return f"{result['perplexity']:.2f}"


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
