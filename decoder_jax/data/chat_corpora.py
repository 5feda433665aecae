"""Public dialogue corpora, as chat examples {"messages": [{"role", "content"}, ...]}.

One corpus so far: the Chit Chat Challenge corpus of the BYU PCC lab, as the PyPI
package `chitchat-dataset` ships it (MIT licence; `pip install chitchat-dataset`, or this
project's `chat` extra). It holds 7,168 open-domain conversations between two people
typing to each other (2018); the 4,018 with both people in them are used. The first
speaker becomes "user", the other "assistant"; a speaker's consecutive messages are one
turn. A long conversation is cut into windows of `turns_per_example` turns (each
starting with a user turn), so an example fits a short context; the split (90% train,
5% val, 5% test) is by conversation, so no conversation has windows in two splits.

`task.source = "pypi:chitchat-dataset"` reads it through here; `write_jsonl` exports the
splits as {split}.jsonl for any other tool.
"""

from __future__ import annotations

import json
import os
import zlib

from decoder_jax.errors import ConfigError, NotFound

CHITCHAT = "pypi:chitchat-dataset"
SOURCES = (CHITCHAT,)
SPLITS = ("train", "val", "test")


def is_corpus(source) -> bool:
  return isinstance(source, str) and source in SOURCES


def split_of(conversation_id: str) -> str:
  """train / val / test by a hash of the conversation's id (90 / 5 / 5)."""
  bucket = zlib.crc32(conversation_id.encode("utf-8")) % 100
  return "train" if bucket < 90 else "val" if bucket < 95 else "test"


def _chitchat():
  try:
    import chitchat_dataset
  except ImportError:
    raise NotFound(f"task.source={CHITCHAT!r} needs the package: pip install "
                   "chitchat-dataset (or this project's [chat] extra)") from None
  return chitchat_dataset.Dataset()


def to_messages(turns) -> list[dict] | None:
  """A conversation's turns (lists of {"text", "sender"}) as alternating user /
  assistant messages, or None when it has not exactly two speakers."""
  speakers = list(dict.fromkeys(u["sender"] for turn in turns for u in turn))
  if len(speakers) != 2:
    return None
  role = {speakers[0]: "user", speakers[1]: "assistant"}
  messages = []
  for turn in turns:
    text = " ".join(u["text"].strip() for u in turn if u["text"].strip())
    if not text:
      continue
    who = role[turn[0]["sender"]]
    if messages and messages[-1]["role"] == who:  # the same speaker again: one turn
      messages[-1]["content"] += " " + text
    else:
      messages.append({"role": who, "content": text})
  return messages


def windows(messages: list[dict], turns_per_example: int) -> list[list[dict]]:
  """Consecutive windows of up to `turns_per_example` messages, each starting with a user
  turn and holding at least one assistant turn."""
  out = []
  start = 0
  while start < len(messages):
    if messages[start]["role"] != "user":
      start += 1
      continue
    window = messages[start:start + turns_per_example]
    if any(m["role"] == "assistant" for m in window):
      out.append(window)
    start += turns_per_example
  return out


def load(source: str, split: str, *, max_examples: int | None = None,
         turns_per_example: int = 6) -> list[dict]:
  """The chat examples of one split of a corpus in SOURCES, in a fixed order."""
  if split not in SPLITS:
    raise NotFound(f"{source} has the splits {list(SPLITS)}, not {split!r}")
  if turns_per_example < 2:
    raise ConfigError(f"turns_per_example must be at least 2, got {turns_per_example}")
  examples = []
  for key, conversation in sorted(_chitchat().items()):
    if split_of(key) != split:
      continue
    messages = to_messages(conversation["messages"])
    if not messages:
      continue
    examples += [{"messages": w, "id": f"{key}/{i}"}
                 for i, w in enumerate(windows(messages, turns_per_example))]
    if max_examples is not None and len(examples) >= max_examples:
      return examples[:max_examples]
  return examples


def write_jsonl(source: str, directory: str, turns_per_example: int = 6) -> dict[str, int]:
  """Writes DIRECTORY/{train,val,test}.jsonl; returns the examples per split."""
  os.makedirs(directory, exist_ok=True)
  counts = {}
  for split in SPLITS:
    examples = load(source, split, turns_per_example=turns_per_example)
    with open(os.path.join(directory, f"{split}.jsonl"), "w", encoding="utf-8") as f:
      for example in examples:
        f.write(json.dumps(example, ensure_ascii=False) + "\n")
    counts[split] = len(examples)
  return counts
