"""Entry point: an OpenAI-compatible HTTP server for a trained workdir or a pretrained model.

  python -m decoder_jax.serve --pretrained=gguf:SmolLM2-135M-Instruct.Q4_1.gguf --port=8000
  python -m decoder_jax.serve --workdir=DIR --dtype=bfloat16 --max_batch=16

Serves POST /v1/completions, POST /v1/chat/completions, GET /v1/models and GET /health
(decoder_jax/serving/app.py). One worker thread owns the model: concurrent requests with
the same decode settings (sampler, max_tokens, stop strings, chat or not) share one
decode call of up to --max_batch prompts, waiting up to --batch_wait_ms for it to fill;
past --max_queue waiting requests, a request gets HTTP 429. The first request of each
batch size and prompt length bucket compiles its program (seconds); later ones reuse it.
Needs the serve extra: pip install -e '.[serve]'.
"""

from __future__ import annotations

import os
import socket

from absl import flags, logging

from decoder_jax import cli, inference, progress
from decoder_jax.errors import ConfigError, RunFailed
from decoder_jax.train.metrics import quiet_library_logs

_WORKDIR = flags.DEFINE_string("workdir", None, "training workdir holding checkpoints")
_PRETRAINED = flags.DEFINE_string("pretrained", None, "a pretrained model instead of a workdir: "
                                  "gguf:FILE, hf:DIR or a converted DIR")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                           "run the model in this dtype (parameters cast to it); default: "
                           "as stored")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "address to listen on (0.0.0.0: every "
                            "interface; there is no authentication)")
_PORT = flags.DEFINE_integer("port", 8000, "port to listen on (0: any free one, logged)")
_MODEL_NAME = flags.DEFINE_string("model_name", None, "the model id in /v1/models and in "
                                  "replies; default: the last part of the source's path")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 8, "prompts per decode call at most")
_MAX_QUEUE = flags.DEFINE_integer("max_queue", 64, "requests waiting at most; more get 429")
_BATCH_WAIT_MS = flags.DEFINE_float("batch_wait_ms", 5.0, "how long the worker waits for "
                                    "more requests to fill a batch")
_MAX_NEW_LIMIT = flags.DEFINE_integer("max_new_tokens_limit", None, "the most max_tokens a "
                                      "request may ask for; default: the model's context "
                                      "less one prompt token (also the default max_tokens)")
flags.mark_flags_as_mutual_exclusive(["workdir", "pretrained"], required=True)


def main(argv):
  del argv
  quiet_library_logs()
  # One line per decode call in the server's log ("decoding: 4 prompts in 0.9 s"), not a
  # progress bar per call.
  os.environ.setdefault(progress.MODE_ENV, "line")
  try:  # the serve extra: told as one line, not an ImportError's traceback
    import uvicorn
    from decoder_jax.serving import app as app_lib
  except ImportError as e:
    raise ConfigError(f"serving needs FastAPI and uvicorn ({e}); install them with "
                      "pip install -e '.[serve]'") from None
  # Everything the flags decide is checked, and the port taken, before the model loads.
  app_lib.check_settings(_MAX_BATCH.value, _MAX_QUEUE.value, _BATCH_WAIT_MS.value,
                         _MAX_NEW_LIMIT.value)
  listener = _bind(_HOST.value, _PORT.value)
  source = _PRETRAINED.value or _WORKDIR.value
  trained = inference.load_model(pretrained=_PRETRAINED.value, workdir=_WORKDIR.value,
                                 dtype=_DTYPE.value)
  name = _MODEL_NAME.value or os.path.basename(os.path.normpath(source.split(":", 1)[-1]))
  app = app_lib.make_app(trained, model_name=name, max_batch=_MAX_BATCH.value,
                         max_queue=_MAX_QUEUE.value, batch_wait_ms=_BATCH_WAIT_MS.value,
                         max_new_tokens_limit=_MAX_NEW_LIMIT.value)
  listener.listen(2048)  # from here a client waits for uvicorn instead of being refused
  host, port = listener.getsockname()[:2]
  logging.info("serving %s on http://%s:%d/v1", name, host, port)
  uvicorn.Server(uvicorn.Config(app, log_level="info")).run(sockets=[listener])


def _bind(host: str, port: int) -> socket.socket:
  """A socket bound to host:port, not listening yet: while the model loads, a client is
  refused rather than left waiting."""
  if not 0 <= port <= 65535:
    raise ConfigError(f"--port must be in [0, 65535], got {port}")
  try:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    family, kind, proto, _, address = infos[0]
    listener = socket.socket(family, kind, proto)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(address)
  except OSError as e:
    raise RunFailed(f"cannot listen on {host}:{port}: {e}") from None
  return listener


def run():
  cli.run(main)


if __name__ == "__main__":
  run()
