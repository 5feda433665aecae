"""Encoder-decoder against a decoder-only model of the same size, Multi30k en->fr, 2-core CPU.

For each architecture this trains configs/multi30k_seq2seq.py:cpu (`encoder_decoder`) or
:cpu,decoder_only (`decoder_only`: same data, vocabulary, steps and optimizer, as many
parameters) from scratch, skipped when ROOT/ARCH.train.json says it finished, then scores
the best checkpoint on test_2016_flickr with sacrebleu, greedy and beam 4, through
`python -m decoder_jax.evaluate`. One markdown table; rows also go to ROOT/rows.json.

  python benchmarks/seq2seq_cpu.py --data_dir ../shared/data --root /tmp/s2s_bench
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import common

ARCHS = {"encoder_decoder": "cpu", "decoder_only": "cpu,decoder_only"}


def read(path: str, default: str) -> str:
  return open(path).read() if os.path.exists(path) else default


def run_arch(arch: str, args, env) -> dict:
  config = f"--config=configs/multi30k_seq2seq.py:{ARCHS[arch]}"
  workdir, log = os.path.join(args.root, arch), os.path.join(args.root, f"{arch}.train.log")
  timing_file = os.path.join(args.root, f"{arch}.train.json")
  timing = json.loads(read(timing_file, "null"))  # common.run's record of the training
  if timing is None:
    timing = common.run([sys.executable, "-m", "decoder_jax.train", config,
                         f"--workdir={workdir}"] + args.train_flags, log, env=env)
    if timing["returncode"] == 0:
      with open(timing_file, "w") as f:
        json.dump(timing, f)
  found = re.findall(r"([\d.]+)M parameters", read(log, ""))
  steps = [json.loads(line)["step"] for line in
           read(os.path.join(workdir, "metrics.jsonl"), "").splitlines() if line.strip()]
  row = {"arch": arch, "params": float(found[-1]) * 1e6 if found else None,
         "steps": max(steps) if steps else None, **timing}
  if timing["returncode"] != 0:
    return row
  for beams in args.beams:
    eval_log = os.path.join(args.root, f"{arch}.beam{beams}.eval.log")
    record = common.run([sys.executable, "-m", "decoder_jax.evaluate", config,
                         f"--workdir={workdir}", f"--split={args.split}",
                         f"--num_beams={beams}"], eval_log, env=env)
    lines = [line for line in read(eval_log, "").splitlines() if line.startswith("{")]
    row[f"beam{beams}"] = {"wall_s": record["wall_s"],
                           **(json.loads(lines[-1]) if lines else {"bleu": None})}
  return row


def table(rows, beams) -> list[str]:
  cells = []
  for row in rows:
    cells.append([row["arch"], f"{row['params'] / 1e6:.3f}M" if row["params"] else "-",
                  row["steps"] or "-", f"{row['wall_s']:.0f}", f"{row['peak_rss_mib']:.0f}"]
                 + [f"{row[f'beam{b}']['bleu']:.2f} ({row[f'beam{b}']['wall_s']:.0f} s)"
                    if row.get(f"beam{b}", {}).get("bleu") is not None else row["status"]
                    for b in beams])
  return common.md_table(["model", "parameters", "steps", "train wall s", "peak host MiB"]
                         + [f"BLEU beam {b} (eval wall)" if b > 1 else "BLEU greedy (eval wall)"
                            for b in beams], cells, right=range(1, 5 + len(beams)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", required=True, help="folder holding multi30k/")
  parser.add_argument("--root", required=True, help="workdirs and logs go here")
  parser.add_argument("--archs", default=",".join(ARCHS))
  parser.add_argument("--split", default="test_2016_flickr")
  parser.add_argument("--beams", default="1,4", help="beam sizes scored (1: greedy)")
  parser.add_argument("--train_flags", nargs="*", default=[],
                      help="extra flags for training, e.g. --config.train.num_steps=20")
  args = parser.parse_args()
  archs, args.beams = args.archs.split(","), [int(b) for b in args.beams.split(",")]
  if any(a not in ARCHS for a in archs):
    parser.error(f"--archs: choose from {list(ARCHS)}")
  os.makedirs(args.root, exist_ok=True)
  env = {**os.environ, "DECODER_JAX_DATA": os.path.abspath(args.data_dir),
         "DECODER_JAX_PROGRESS": "line"}
  rows = [run_arch(arch, args, env) for arch in archs]
  with open(os.path.join(args.root, "rows.json"), "w") as f:
    json.dump(rows, f, indent=1)
  print("\n".join(table(rows, args.beams)))


if __name__ == "__main__":
  main()
