"""Entry point: evaluate a fine-tuned (or, with --zero_shot, the pretrained) model on a task.

  python -m decoder_jax.evaluate --config=configs/smollm2_multi30k.py:lora --workdir=W \
      --split=test_2016_flickr --num_beams=4
  python -m decoder_jax.evaluate --config=configs/smollm2_multi30k.py:lora --workdir=W \
      --source_file=test.en --reference_file=test.fr
  python -m decoder_jax.evaluate --config=configs/smollm2_sst2.py:lora --workdir=W \
      --tsv_file=DATA/sst2/dev.tsv
  python -m decoder_jax.evaluate --config=configs/smollm2_sst2.py:lora --zero_shot

The work is done by decoder_jax.evaluation.finetuned (importable without these flags).
Prints one JSON object: the metric ("bleu", or "accuracy" and "macro_f1"), the number of
examples, where they came from, the decoding settings and which weights were scored.
The prompt format is the config's, so zero-shot and fine-tuned numbers are comparable.
"""

from __future__ import annotations

import json

from absl import flags, logging
from ml_collections import config_flags

from decoder_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "task config (configs/*.py:ARG)",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "training workdir (empty or absent with "
                               "--zero_shot)")
_ZERO_SHOT = flags.DEFINE_bool("zero_shot", False, "score config.init_from before fine-tuning")
_WEIGHTS = flags.DEFINE_enum("weights", "best", ["best", "latest"],
                             "the workdir's best checkpoint (by config.eval.metric) or latest")
_SPLIT = flags.DEFINE_string("split", None, "a split of config.task.source (default: the "
                             "config's eval split)")
_SOURCE_FILE = flags.DEFINE_string("source_file", None, "translation: one sentence per line")
_REFERENCE_FILE = flags.DEFINE_string("reference_file", None, "translation: references, "
                                      "line-aligned with --source_file")
_TSV_FILE = flags.DEFINE_string("tsv_file", None, "classification: a TSV in the SST-2 layout")
_NUM_BEAMS = flags.DEFINE_integer("num_beams", None, "beam size (1: greedy; default: config)")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", None, "default: config.eval")
_MAX_EXAMPLES = flags.DEFINE_integer("max_examples", None, "score only the first N examples")
_OUTPUT = flags.DEFINE_string("output", None, "also write the generations (JSONL) here")


def main(argv):
  del argv
  from decoder_jax.train.metrics import quiet_library_logs

  quiet_library_logs()
  from decoder_jax import compile_cache
  from decoder_jax.evaluation import finetuned

  compile_cache.enable(_CONFIG.value.get("compilation_cache_dir"))

  result = finetuned.evaluate(
      _CONFIG.value, _WORKDIR.value, zero_shot=_ZERO_SHOT.value, weights=_WEIGHTS.value,
      split=_SPLIT.value, source_file=_SOURCE_FILE.value,
      reference_file=_REFERENCE_FILE.value, tsv_file=_TSV_FILE.value,
      num_beams=_NUM_BEAMS.value, max_new_tokens=_MAX_NEW_TOKENS.value,
      max_examples=_MAX_EXAMPLES.value, output=_OUTPUT.value,
      config_name=flags.FLAGS["config"].serialize().split("=", 1)[-1])
  logging.info("evaluated %d examples in %.1f s", result["examples"], result["seconds"])
  print(json.dumps(result))


def run():
  flags.mark_flag_as_required("config")
  cli.run(main)


if __name__ == "__main__":
  run()
