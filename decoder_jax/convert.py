"""Entry point: convert a pretrained model into a decoder_jax directory.

  python -m decoder_jax.convert --source=gguf:SmolLM2-135M-Instruct.Q4_1.gguf --output=DIR
  python -m decoder_jax.convert --source=hf:HF_MODEL_DIR --output=DIR [--dtype=bfloat16]

DIR then holds model_config.json, params/ (an orbax checkpoint of the parameters), the
tokenizer (tokenizer.json + hf_tokenizer/) and converted_from.json; load it with
`decoder_jax.load_pretrained(DIR)` or `python -m decoder_jax.generate --pretrained=DIR`.
Converting once skips dequantizing or re-reading safetensors on every load.
"""

from __future__ import annotations

import json
import os

from absl import flags, logging

from decoder_jax import cli
from decoder_jax.errors import ConfigError

_SOURCE = flags.DEFINE_string("source", None, "gguf:FILE, hf:DIR (or a converted DIR)")
_OUTPUT = flags.DEFINE_string("output", None, "directory to write (must not hold params yet)")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                           "parameter and compute dtype to store (default: the source's; "
                           "float32 for GGUF)")
flags.mark_flags_as_required(["source", "output"])


def convert(source: str, output: str, dtype: str | None = None):
  """Loads `source` and writes it to `output` as a converted directory. Returns the model."""
  import orbax.checkpoint as ocp

  from decoder_jax import pretrained
  from decoder_jax.data import tokenizers
  from decoder_jax.workdir import MODEL_CONFIG_FILE

  output = os.path.abspath(os.path.expanduser(output))
  params_dir = os.path.join(output, pretrained.PARAMS_DIR)
  if os.path.exists(params_dir):
    raise ConfigError(f"{params_dir} already exists; choose another --output")
  model = pretrained.load_pretrained(source, dtype=dtype)
  os.makedirs(output, exist_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(params_dir, model.params)
  with open(os.path.join(output, MODEL_CONFIG_FILE), "w") as f:
    json.dump(model.config.to_dict(), f, indent=1)
  tokenizers.save_tokenizer(model.tokenizer, output)
  with open(os.path.join(output, pretrained.SOURCE_FILE), "w") as f:
    json.dump({"source": source}, f, indent=1)
  return model


def main(argv):
  del argv
  from decoder_jax.train.metrics import quiet_library_logs
  quiet_library_logs()
  model = convert(_SOURCE.value, _OUTPUT.value, _DTYPE.value)
  logging.info("wrote %s (%s, %d layers, width %d, vocab %d)", _OUTPUT.value,
               model.config.family, model.config.num_layers, model.config.width,
               model.config.vocab_size)


def run():
  cli.run(main)


if __name__ == "__main__":
  run()
