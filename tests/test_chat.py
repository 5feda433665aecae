"""The chat task: conversations rendered with SmolLM2's chat template, loss on assistant
turns only; the chitchat corpus; training, evaluate and `generate --chat` on a tiny model."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO
from decoder_jax.data import chat_corpora, tasks
from decoder_jax.errors import ConfigError

CONVERSATION = {"messages": [
    {"role": "user", "content": "hi there"},
    {"role": "assistant", "content": "hello! how are you?"},
    {"role": "user", "content": "fine, and you?"},
    {"role": "assistant", "content": "great, thanks"},
]}


def spans(tokenizer, ids, mask):
  """The decoded runs of tokens with mask True."""
  out, run = [], []
  for i, m in zip(ids, mask):
    if m:
      run.append(i)
    elif run:
      out.append(tokenizer.decode(run))
      run = []
  return out + ([tokenizer.decode(run)] if run else [])


def test_loss_lies_on_every_assistant_turn_and_nothing_else(smol_tokenizer):
  task = tasks.ChatTask(smol_tokenizer)
  ids, mask = task.encode_turns(CONVERSATION)
  rendered = smol_tokenizer.apply_chat_template(CONVERSATION["messages"],
                                                add_generation_prompt=False)
  assert smol_tokenizer.decode(ids) == rendered
  # Both replies with their end-of-turn token; no user text, no template scaffolding.
  assert spans(smol_tokenizer, ids, mask) == ["hello! how are you?<|im_end|>\n",
                                              "great, thanks<|im_end|>\n"]
  encoded = tasks.encode_examples(task, [CONVERSATION], max_length=256)
  batch = tasks.collate(encoded, np.array([0]), 256, 0, False)
  weighted = batch["targets"][0][batch["weights"][0] > 0]
  assert smol_tokenizer.decode(weighted.tolist()) == "".join(spans(smol_tokenizer, ids, mask))
  # Generation at eval time answers the last user turn; the reference is the last reply.
  prompt = smol_tokenizer.decode(task.prompts([CONVERSATION])[0])
  assert prompt.endswith("fine, and you?<|im_end|>\n<|im_start|>assistant\n")
  assert task.reference(CONVERSATION) == "great, thanks"


def test_long_conversations_are_cut_from_the_right(smol_tokenizer):
  task = tasks.ChatTask(smol_tokenizer)
  full, _ = task.encode_turns(CONVERSATION)
  encoded = tasks.encode_examples(task, [CONVERSATION], max_length=len(full) - 6)
  assert encoded.stats["truncated"] == 1
  np.testing.assert_array_equal(encoded.tokens[0], full[:len(full) - 5])  # the start kept
  short = {"messages": CONVERSATION["messages"][:2]}
  no_reply_left = tasks.encode_examples(task, [short], max_length=20)
  assert no_reply_left.stats["dropped"] == 1 and len(no_reply_left) == 0


@pytest.mark.parametrize("example, message", [
    ({"text": "hi"}, "needs a non-empty list"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "must be"),
    ({"messages": [{"role": "user", "content": "only a question"}]}, "no assistant turn"),
])
def test_malformed_conversations_are_refused(smol_tokenizer, example, message):
  with pytest.raises(ConfigError, match=message):
    tasks.ChatTask(smol_tokenizer).encode_turns(example)


def test_chitchat_turns_become_alternating_messages_split_by_conversation():
  turns = [[{"text": "hey", "sender": "a"}, {"text": "you there?", "sender": "a"}],
           [{"text": "yes", "sender": "b"}], [{"text": " ", "sender": "a"}],
           [{"text": "good", "sender": "b"}]]
  assert chat_corpora.to_messages(turns) == [
      {"role": "user", "content": "hey you there?"},
      {"role": "assistant", "content": "yes good"}]  # b twice in a row: one turn
  assert chat_corpora.to_messages([[{"text": "alone", "sender": "a"}]]) is None
  messages = [{"role": r, "content": str(i)} for i, r in enumerate("uauaua")]
  messages = [{"role": {"u": "user", "a": "assistant"}[m["role"]], "content": m["content"]}
              for m in messages]
  assert [[m["content"] for m in w] for w in chat_corpora.windows(messages, 4)] == [
      ["0", "1", "2", "3"], ["4", "5"]]
  splits = [chat_corpora.split_of(f"conversation-{i}") for i in range(2000)]
  assert abs(splits.count("train") / 2000 - 0.9) < 0.03 and splits.count("test") > 50


def test_the_chitchat_corpus_loads_from_its_package():
  pytest.importorskip("chitchat_dataset")
  val = chat_corpora.load(chat_corpora.CHITCHAT, "val", max_examples=50)
  assert len(val) == 50 and all(m["role"] in ("user", "assistant")
                                for e in val for m in e["messages"])
  train_ids = {e["id"].split("/")[0] for e in chat_corpora.load(chat_corpora.CHITCHAT, "train",
                                                                 max_examples=2000)}
  assert not train_ids & {e["id"].split("/")[0] for e in val}  # no conversation in both


def test_chat_fine_tuning_evaluate_and_generate_turn_by_turn(tmp_path, tiny_pretrained):
  pytest.importorskip("chitchat_dataset")
  from decoder_jax.evaluation import finetuned
  from decoder_jax.train import loop

  data = tmp_path / "chat"
  data.mkdir()
  for split, n in (("train", 32), ("val", 8)):
    with open(data / f"{split}.jsonl", "w") as f:
      for example in chat_corpora.load(chat_corpora.CHITCHAT, split, max_examples=n):
        f.write(json.dumps(example) + "\n")
  sys.path.insert(0, str(REPO))
  from configs import smollm2_chat
  config = smollm2_chat.get_config("lora,cpu")
  config.init_from = str(tiny_pretrained)
  config.task.update(source=str(data), max_length=96, buckets=(96,))
  config.train.update(num_steps=2, batch_size=8, log_every=1, eval_every=2,
                      checkpoint_every=2, warmup_steps=1, learning_rate=1e-2)
  config.eval.max_new_tokens = 8
  config.mesh.num_cpu_devices = None
  workdir = str(tmp_path / "w")
  # One device: this tests the task, not sharding, and compiles several times faster
  # than on the 8 forced ones.
  metrics = loop.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  assert metrics["eval/perplexity"] == pytest.approx(np.exp(metrics["eval/loss"]), rel=1e-6)
  result = finetuned.evaluate(config, workdir, weights="latest", num_replies=2)
  assert result["loss"] == pytest.approx(metrics["eval/loss"], abs=1e-5)
  assert len(result["replies"]) == 2 and all(set(r) == {"said", "reply", "reference"}
                                             for r in result["replies"])
  # generate --chat without --prompt: two turns on stdin, two replies, the second with
  # the first exchange as context.
  env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": str(REPO)}
  done = subprocess.run([sys.executable, "-m", "decoder_jax.generate", f"--workdir={workdir}",
                         "--chat", "--temperature=0", "--max_new_tokens=5"],
                        input="hello\nwhat do you like?\n", cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert len(done.stdout.splitlines()) == 2, done.stdout
