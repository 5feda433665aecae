"""Entry point: sample text from a trained workdir or a pretrained model.

  python -m decoder_jax.generate --workdir=DIR --prompt="ROMEO:" --max_new_tokens=500 \\
      --temperature=0.8 --top_k=200 --seed=0
  python -m decoder_jax.generate --pretrained=gguf:SmolLM2-135M-Instruct.Q4_1.gguf --chat \\
      --prompt="What is the capital of France?" --max_new_tokens=40 --temperature=0
  python -m decoder_jax.generate --workdir=DIR --prompts_file=prompts.txt --num_beams=4 \\
      --max_new_tokens=32 --output=out.jsonl
  python -m decoder_jax.generate --pretrained=fetch:smollm2-135m-instruct --prompts_file=P \\
      --stop="\\n\\n" --stop="User:" --temperature=0 --draft_layers=10 --num_draft=4

Every prompt, alone or in a batch (--prompts_file, --num_samples), may run past the
model's context: when a window is full its last half becomes the next window's prompt, and
each prompt of a batch comes out as it would alone (with the same --seed). Beam search
keeps its output in one window, so a long prompt keeps its last tokens. --stop takes
strings of any length (repeatable); the text is cut before the first one. --num_samples
prefills each prompt once and copies its cache to the samples. --draft_layers=N (the
model's first N layers), --draft_pretrained or --draft_workdir decode speculatively:
the draft proposes --num_draft tokens, the model keeps those it would have drawn itself
(the same distribution; greedy gives the same tokens), for prompts that fit the context
with max_new_tokens + num_draft. --output writes one JSON object per prompt: {"prompt",
"text", "tokens", "logprob", "finish_reason"} for the first sample (the best beam), and
"samples" holding every sample or beam.

--pretrained takes what decoder_jax.load_pretrained does: gguf:FILE, hf:DIR, or a
directory written by `python -m decoder_jax.convert`. --chat sends each prompt as a user
message through the tokenizer's chat template and prints the reply; generation stops at
any of the tokenizer's end-of-sequence tokens. --chat without --prompt or --prompts_file
is a conversation: each line read from stdin is the next user turn, answered with the
conversation so far as context (the oldest turns dropped when it outgrows the context):

  python -m decoder_jax.generate --workdir=W --chat --temperature=0.7 --max_new_tokens=60

The workdir of an encoder-decoder (configs/multi30k_seq2seq.py) translates: each prompt is
a source sentence and one translation a line is printed (--output: {"source", "text"}),
greedy with --temperature=0, sampled, or by beam search; max_new_tokens defaults to what
the decoder's positions hold.

  python -m decoder_jax.generate --workdir=W --prompt="A dog runs on the beach." \
      --temperature=0 --num_beams=4
"""

import json
import os
import re
import sys

from absl import flags

from decoder_jax import cli, decoding, inference, seq2seq
from decoder_jax.errors import ConfigError, NotFound
from decoder_jax.train.metrics import quiet_library_logs

_WORKDIR = flags.DEFINE_string("workdir", None, "training workdir holding checkpoints")
_PRETRAINED = flags.DEFINE_string("pretrained", None, "a pretrained model instead of a workdir: "
                                  "gguf:FILE, hf:DIR or a converted DIR")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                           "run the model in this dtype (parameters cast to it); default: "
                           "as stored")
_CHAT = flags.DEFINE_bool("chat", False, "wrap each prompt as a user message with the chat "
                          "template and generate the reply")
_PROMPT = flags.DEFINE_string("prompt", "\n", "text to continue")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "one prompt per line (overrides --prompt)")
_OUTPUT = flags.DEFINE_string("output", None, "write JSONL results here")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 500, "tokens to generate at most")
_MIN_NEW = flags.DEFINE_integer("min_new_tokens", 0, "tokens to generate before a stop counts")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "softmax temperature; 0 = greedy")
_TOP_K = flags.DEFINE_integer("top_k", None, "sample among the k likeliest tokens (>= 1); "
                              "unset: no top-k")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "nucleus: the likeliest tokens holding this mass")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "samples per prompt")
_NUM_BEAMS = flags.DEFINE_integer("num_beams", 1, "beam search with this many beams (> 1)")
_LENGTH_PENALTY = flags.DEFINE_float("length_penalty", 1.0, "beam score = logprob / length**this")
_STOP = flags.DEFINE_multi_string("stop", [], "stop at this string, any length, and cut the "
                                  "text before it (repeatable); \\n, \\t and \\\\ are "
                                  "a newline, a tab and a backslash")
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed")
_DRAFT_LAYERS = flags.DEFINE_integer("draft_layers", None, "speculative decoding with the "
                                     "model's own first N layers as the draft")
_DRAFT_PRETRAINED = flags.DEFINE_string("draft_pretrained", None, "speculative decoding with "
                                        "this pretrained model as the draft (as --pretrained)")
_DRAFT_WORKDIR = flags.DEFINE_string("draft_workdir", None, "speculative decoding with this "
                                     "training workdir's model as the draft")
_NUM_DRAFT = flags.DEFINE_integer("num_draft", 4, "tokens the draft proposes per target pass")
flags.mark_flags_as_mutual_exclusive(["workdir", "pretrained"], required=True)
flags.mark_flags_as_mutual_exclusive(["draft_layers", "draft_pretrained", "draft_workdir"])


def main(argv):
  del argv
  quiet_library_logs()
  # Flags are checked before the model loads, so a typo costs no loading time.
  sampler = decoding.make_sampler(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)  # validates
  inference.check_settings(max_new_tokens=_MAX_NEW.value, min_new_tokens=_MIN_NEW.value,
                           num_beams=_NUM_BEAMS.value, num_samples=_NUM_SAMPLES.value)
  prompts = _read_prompts() if _PROMPTS_FILE.value else [_PROMPT.value]
  if _OUTPUT.value and not os.path.isdir(os.path.dirname(os.path.abspath(_OUTPUT.value))):
    raise NotFound(f"--output={_OUTPUT.value}: its folder does not exist")
  trained = inference.load_model(pretrained=_PRETRAINED.value, workdir=_WORKDIR.value,
                                 dtype=_DTYPE.value)
  chat = _CHAT.value
  if trained.config.is_encoder_decoder:
    _translate(trained, prompts, sampler)
    return
  if chat and not _PROMPTS_FILE.value and not flags.FLAGS["prompt"].present:
    _converse(trained, sampler)
    return
  results = inference.generate_batch(
      trained, prompts, max_new_tokens=_MAX_NEW.value, sampler=sampler, seed=_SEED.value,
      num_samples=_NUM_SAMPLES.value, num_beams=_NUM_BEAMS.value,
      min_new_tokens=_MIN_NEW.value, stop=tuple(unescape(s) for s in _STOP.value),
      length_penalty=_LENGTH_PENALTY.value, chat=chat, draft=_load_draft(trained),
      num_draft=_NUM_DRAFT.value)
  lines = [json.dumps({"prompt": r["prompt"], **r["samples"][0], "samples": r["samples"]})
           for r in results]
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w", encoding="utf-8") as f:
      f.write("\n".join(lines) + "\n")
  several = len(results) > 1 or len(results[0]["samples"]) > 1
  for result in results:
    for sample in result["samples"]:
      print(sample["text"] if chat else result["prompt"] + sample["text"])
      if several:  # one text alone prints as the text only
        print("---")


def _translate(trained, sources, sampler) -> None:
  """An encoder-decoder's workdir: each prompt is a source sentence, printed translated
  (the decoder-only options that do not apply are refused)."""
  unsupported = [name for name in ("chat", "num_samples", "min_new_tokens", "stop",
                                   "draft_layers", "draft_pretrained", "draft_workdir")
                 if flags.FLAGS[name].present]
  if unsupported:
    raise ConfigError(f"--{', --'.join(unsupported)}: not for an encoder-decoder, which "
                      "translates each prompt as a source sentence")
  max_new = _MAX_NEW.value
  if not flags.FLAGS["max_new_tokens"].present and not trained.config.use_rope:
    max_new = min(max_new, trained.config.max_length - 1)  # the decoder's positions
  texts = seq2seq.translate_texts(trained, sources, max_new_tokens=max_new,
                                  num_beams=_NUM_BEAMS.value, sampler=sampler,
                                  length_penalty=_LENGTH_PENALTY.value, seed=_SEED.value)
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w", encoding="utf-8") as f:
      f.write("".join(json.dumps({"source": s, "text": t}, ensure_ascii=False) + "\n"
                      for s, t in zip(sources, texts)))
  print("\n".join(texts))


def unescape(text: str) -> str:
  """A --stop value with \\n, \\t and \\\\ written out (a shell passes them as typed)."""
  return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)],
                text)


def _load_draft(trained):
  """The draft model of --draft_layers / --draft_pretrained / --draft_workdir, or None."""
  if _DRAFT_LAYERS.value is not None:
    return inference.self_draft(trained, _DRAFT_LAYERS.value)
  if not (_DRAFT_PRETRAINED.value or _DRAFT_WORKDIR.value):
    return None
  return inference.load_model(pretrained=_DRAFT_PRETRAINED.value,
                              workdir=_DRAFT_WORKDIR.value, dtype=_DTYPE.value)


def _converse(trained, sampler) -> None:
  """--chat without --prompt: each line on stdin is the user's next turn; the reply,
  generated with the whole conversation so far as context, is printed after it."""
  interactive = sys.stdin.isatty()
  messages = []
  while True:
    if interactive:
      sys.stderr.write("you> ")
      sys.stderr.flush()
    line = sys.stdin.readline()
    if not line:  # end of input (Ctrl-D)
      return
    if not line.strip():
      continue
    messages.append({"role": "user", "content": line.strip()})
    reply = inference.chat_reply(trained, messages, max_new_tokens=_MAX_NEW.value,
                                 sampler=sampler, seed=_SEED.value + len(messages))
    messages.append({"role": "assistant", "content": reply})
    print(reply, flush=True)


def _read_prompts() -> list[str]:
  path = _PROMPTS_FILE.value
  if not os.path.isfile(path):
    raise NotFound(f"--prompts_file={path} does not exist (or is not a file)")
  with open(path, encoding="utf-8") as f:
    prompts = [line.rstrip("\n") for line in f if line.strip()]
  if not prompts:
    raise ConfigError(f"--prompts_file={path} holds no prompts")
  return prompts


def run():
  cli.run(main)


if __name__ == "__main__":
  run()
