"""Entry point: sample text from a trained workdir.

  python -m decoder_jax.generate --workdir=DIR --prompt="ROMEO:" --max_new_tokens=500 \
      --temperature=0.8 --top_k=200 --seed=0
"""

from absl import app, flags, logging

from decoder_jax import decoding, inference
from decoder_jax.train.metrics import quiet_library_logs

_WORKDIR = flags.DEFINE_string("workdir", None, "training workdir holding checkpoints")
_PROMPT = flags.DEFINE_string("prompt", "\n", "text to continue")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 500, "tokens to generate")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "softmax temperature; 0 = greedy")
_TOP_K = flags.DEFINE_integer("top_k", 200, "sample among the k likeliest tokens; 0 = all")
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed")
flags.mark_flag_as_required("workdir")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  quiet_library_logs()
  trained = inference.load_trained(_WORKDIR.value)
  logging.info("loaded step %d from %s", trained.step, _WORKDIR.value)
  sampler = decoding.make_sampler(_TEMPERATURE.value, _TOP_K.value)
  text = inference.complete(trained, _PROMPT.value, max_new_tokens=_MAX_NEW.value,
                            sampler=sampler, seed=_SEED.value)
  print(_PROMPT.value + text)


def run():
  app.run(main)


if __name__ == "__main__":
  run()
