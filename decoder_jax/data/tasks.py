"""Fine-tuning tasks: raw examples -> token ids -> padded batches.

A task turns an example into prompt ids and response ids. The model reads
seq = prompt + response; inputs = seq[:-1], targets = seq[1:], and only targets that are
response tokens carry loss weight (1.0), so the model learns to answer, not to
reproduce prompts. Tasks:
  * SFTTask: a prompt template over the example's fields; response = one field + eos.
  * TranslationTask: the source sentence in the prompt, target + eos as the response;
    the prompt ids alone and the reference text serve generation at eval time.
  * ClassificationTask: mode "label_words" (the response is the label's one-token word,
    scored by the LM head at the answer position) or mode "head" (no response: a
    classification head reads the final prompt token).
  * ChatTask: a conversation {"messages": [{"role", "content"}, ...]} rendered with the
    tokenizer's chat template; every assistant turn (with its end-of-turn tokens)
    carries loss, the rest does not (multi-turn: the weights mark several spans).
  * SeqToSeqTask: parallel text with no prompt template; source ids = encode(source) +
    [eos], target = encode(target). For an encoder-decoder the source is the encoder's
    input and the decoder learns [bos] + target -> target + [eos]; for a decoder-only
    model the source ids are the prompt (their eos separates source from target) and
    target + [eos] the response.

Batches (numpy; B = this process's rows of the global batch, L = a bucket length):
  LM-style (sft, translation, label_words):
    inputs, targets int32 [B, L]; weights float32 [B, L]; label_words adds labels and
    answer_index int32 [B] (the input position whose logits score the label word).
  head: inputs int32 [B, L]; last_index int32 [B] (final non-padding input position);
    labels int32 [B]; weights float32 [B] (0 on the padding rows of an eval batch).
  encoder-decoder (seq2seq): source int32 [B, L]; source_lengths int32 [B] (real source
    tokens; 1 on padding rows); inputs = [bos] + target, targets = target + [eos] int32
    [B, L]; weights float32 [B, L] (1 on the target's tokens). L, one bucket for both
    sides, holds the longer of source and target + 1.
Examples are right-padded with pad_id; padding carries weight 0.

Training batches group examples of similar length (sorted within windows of a shuffled
epoch) and pad to the smallest of a few bucket lengths, so the jitted step compiles
only a few shapes. As in pipeline.py, step s's global batch depends only on (seed, s)
(each epoch is shuffled afresh), process p keeps its slice of rows, and the grain
iterator's state is its step counter, so get_state()/set_state() resume exactly.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import string
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from absl import logging
from ml_collections import config_dict

from decoder_jax.data import chat_corpora, task_sources, tokenizers
from decoder_jax.data.pipeline import (_READ_OPTIONS, _check_choice, _process_rows,
                                       fill_defaults)
from decoder_jax.errors import ConfigError, NotFound

KINDS = ("sft", "translation", "classification", "chat", "seq2seq")
CHAT_ROLES = ("system", "user", "assistant")
MODES = ("label_words", "head")
# BPE by default: on Multi30k en+fr at 8000 pieces it trains in 0.4 s (unigram: 2.3 s) and
# writes 3-5% fewer tokens a sentence (unigram splits even "Deux" as "▁De ux").
SPM_MODEL_TYPES = ("bpe", "unigram")
DEFAULT_TEMPLATES = {
    "sft": "{prompt}",
    "translation": "Translate {source_language} to {target_language}:\n{source}\n"
                   "{target_language}:",
    "classification": "Sentence: {text}\nSentiment:",
    "chat": "{messages}",  # unused: the tokenizer's chat template renders a conversation
    "seq2seq": "{source}",  # the source sentence as it is; no template may be set
}
# Eval splits tried, in order, when task.eval_split is None.
EVAL_SPLIT_NAMES = ("validation", "val", "dev", "test")
LANGUAGE_NAMES = {"en": "English", "fr": "French", "de": "German", "cs": "Czech",
                  "es": "Spanish", "it": "Italian", "pt": "Portuguese", "ru": "Russian",
                  "zh": "Chinese", "ja": "Japanese", "hi": "Hindi", "ro": "Romanian",
                  "tr": "Turkish", "fi": "Finnish", "et": "Estonian", "lv": "Latvian",
                  "nl": "Dutch", "gu": "Gujarati", "kk": "Kazakh", "lt": "Lithuanian"}


def default_task_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.kind = "translation"  # "sft" | "translation" | "classification" | "chat" | "seq2seq".
  # A local directory (multi30k / sst2 layout, or {split}.jsonl for sft) or a tfds
  # catalog name ("wmt14_translate/fr-en", "glue/sst2").
  config.source = config_dict.placeholder(str)
  config.train_split = "train"
  # Comma-separated for several (the first is the main one); None: the first of
  # validation, val, dev, test that the data has.
  config.eval_split = config_dict.placeholder(str)
  config.src_lang = "en"
  config.tgt_lang = "fr"
  config.label_names = ("0", "1")  # Labels as the data writes them; index = class id.
  config.label_words = (" negative", " positive")  # mode="label_words": one token each.
  config.label_field = "label"
  config.text_field = config_dict.placeholder(str)  # None: "content"/"sentence" for TSV.
  config.mode = "label_words"  # Classification: "label_words" | "head".
  config.response_field = "response"  # sft: the example field the model learns to write.
  config.prompt_template = config_dict.placeholder(str)  # None: DEFAULT_TEMPLATES[kind].
  config.use_chat_template = False  # Wrap the filled template as the user's chat turn.
  # Text put before the response: None means " " without the chat template (so
  # "French:" is followed by " Deux ..."), "" with it (the reply starts its own turn).
  config.response_prefix = config_dict.placeholder(str)
  config.max_length = 128  # Input tokens per example (the model's sequence length).
  config.max_train_examples = config_dict.placeholder(int)  # None: all; else the first n.
  config.max_eval_examples = config_dict.placeholder(int)
  config.buckets = config_dict.placeholder(tuple)  # None: powers of two up to max_length.
  config.bucket_window = 16  # Batches per length-sorting window of a shuffled epoch.
  # None: the eos id, else 0 (seq2seq: the vocabulary's padding id first, if it has one).
  config.pad_id = config_dict.placeholder(int)
  config.eos_id = config_dict.placeholder(int)  # None: the tokenizer's (required for LM).
  config.tfds_data_dir = config_dict.placeholder(str)  # None: the tfds default.
  # seq2seq from scratch (no init_from): a joint SentencePiece vocabulary of this many
  # pieces, trained on the train split's sources and targets on the run's first start
  # (train_vocabulary). None for the other kinds.
  config.vocab_size = config_dict.placeholder(int)
  config.spm_model_type = "bpe"  # One of SPM_MODEL_TYPES.
  return config


# ----------------------------------------------------------------------------- tokens


def _takes_special(tokenizer) -> bool:
  try:
    return "add_special_tokens" in inspect.signature(tokenizer.encode).parameters
  except (TypeError, ValueError):
    return False


def _encode_many(tokenizer, texts: list[str], special: bool) -> list[list[int]]:
  """Ids of each text; `special` asks for the tokenizer's specials (e.g. a leading BOS)
  where it supports them (HFTokenizer), as transformers does for a prompt."""
  if not texts:
    return []
  takes = _takes_special(tokenizer)
  if hasattr(tokenizer, "encode_batch"):
    if takes:
      return [list(ids) for ids in tokenizer.encode_batch(texts, add_special_tokens=special)]
    return [list(ids) for ids in tokenizer.encode_batch(texts)]
  if takes:
    return [list(tokenizer.encode(t, add_special_tokens=special)) for t in texts]
  return [list(tokenizer.encode(t)) for t in texts]


class PromptTemplate:
  """A str.format template with named placeholders ("{source}"); write "{{" for "{"."""

  def __init__(self, template: str, *, required: Sequence[str] = (),
               allowed: Sequence[str] | None = None, name: str = "task.prompt_template"):
    if not isinstance(template, str) or not template:
      raise ConfigError(f"{name} must be a non-empty string; got {template!r}.")
    try:
      parsed = list(string.Formatter().parse(template))
    except ValueError as e:
      raise ConfigError(f"{name} {template!r} is not a valid template ({e}); write {{{{ and "
                        "}} for literal braces.") from None
    fields = []
    for _, field, _, _ in parsed:
      if field is None:
        continue
      if not field.isidentifier():
        raise ConfigError(f"{name} {template!r}: placeholder {{{field}}} must be a plain name "
                          "such as {source}.")
      if field not in fields:
        fields.append(field)
    for field in required:
      if field not in fields:
        raise ConfigError(f"{name} {template!r} lacks the placeholder {{{field}}}; the task "
                          "needs it to show the example.")
    if allowed is not None:
      for field in fields:
        if field not in allowed:
          raise ConfigError(f"{name} {template!r}: unknown placeholder {{{field}}}; this task "
                            f"fills {', '.join('{' + a + '}' for a in allowed)}.")
    if not fields:
      raise ConfigError(f"{name} {template!r} has no placeholder, so every prompt would be "
                        "the same.")
    self.template = template
    self.placeholders = tuple(fields)
    self.name = name

  def fill(self, values: Mapping[str, Any]) -> str:
    missing = [f for f in self.placeholders if f not in values]
    if missing:
      raise ConfigError(f"{self.name} {self.template!r} needs field {missing[0]!r}, which the "
                        f"example lacks; it has {sorted(values)}.")
    return self.template.format(**{f: values[f] for f in self.placeholders})


class Task:
  """Shared prompt handling: template, optional chat wrapping, eos, response prefix."""

  kind = ""
  lm_style = True  # Batches with targets and per-token weights.
  needs_eos = True

  def __init__(self, tokenizer, template: PromptTemplate, *, use_chat_template: bool = False,
               response_prefix: str | None = None, eos_id: int | None = None):
    self.tokenizer = tokenizer
    self.template = template
    self.use_chat_template = bool(use_chat_template)
    if self.use_chat_template and (not hasattr(tokenizer, "apply_chat_template")
                                   or getattr(tokenizer, "chat_template", None) is None):
      raise ConfigError(f"use_chat_template=True, but the {type(tokenizer).__name__} has no "
                        "chat template.")
    self.response_prefix = ((" " if not self.use_chat_template else "")
                            if response_prefix is None else response_prefix)
    eos = tokenizer.eos_id if eos_id is None else eos_id
    if eos is not None and not 0 <= eos < tokenizer.vocab_size:
      raise ConfigError(f"eos_id {eos} is outside the vocabulary [0, {tokenizer.vocab_size}).")
    if eos is None and self.needs_eos:
      raise ConfigError(f"The {type(tokenizer).__name__} has no end-of-sequence id, and the "
                        f"{self.kind} task appends one to every response: set task.eos_id "
                        "(e.g. the id of a newline).")
    self.eos_id = eos

  def template_values(self, example: Mapping[str, Any]) -> Mapping[str, Any]:
    return example

  def prompt_text(self, example: Mapping[str, Any]) -> str:
    text = self.template.fill(self.template_values(example))
    if self.use_chat_template:
      return self.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                add_generation_prompt=True)
    return text

  def prompts(self, examples: Sequence[Mapping[str, Any]]) -> list[list[int]]:
    """Prompt ids; the chat template writes its own specials, so none are added then."""
    texts = [self.prompt_text(e) for e in examples]
    return _encode_many(self.tokenizer, texts, special=not self.use_chat_template)

  def prompt_ids(self, example: Mapping[str, Any]) -> list[int]:
    return self.prompts([example])[0]

  def responses(self, examples: Sequence[Mapping[str, Any]]) -> list[list[int]]:
    texts = [self.response_prefix + self.response_text(e) for e in examples]
    return [ids + [self.eos_id] for ids in _encode_many(self.tokenizer, texts, special=False)]

  def response_text(self, example: Mapping[str, Any]) -> str:
    raise NotImplementedError

  def encode(self, example: Mapping[str, Any]) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of one example; the response ends with eos."""
    return self.prompts([example])[0], self.responses([example])[0]

  def encode_all(self, examples: Sequence[Mapping[str, Any]]):
    return list(zip(self.prompts(examples), self.responses(examples)))

  def decode_response(self, ids) -> str:
    """Generated ids -> answer text: cut at the first end id, decoded, stripped."""
    ends = set(getattr(self.tokenizer, "eos_ids", None) or []) | {self.eos_id}
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    cut = next((k for k, i in enumerate(ids) if i in ends), len(ids))
    return self.tokenizer.decode(ids[:cut]).strip()


def _field(example: Mapping[str, Any], field: str, role: str) -> str:
  if field not in example:
    raise ConfigError(f"The {role} field {field!r} is missing from an example with fields "
                      f"{sorted(example)}.")
  value = example[field]
  if not isinstance(value, str):
    raise ConfigError(f"The {role} field {field!r} must be text; got {type(value).__name__}.")
  return value


class SFTTask(Task):
  """Supervised fine-tuning: prompt = template over the example's fields; the model
  learns to write example[response_field] then eos."""

  kind = "sft"

  def __init__(self, tokenizer, prompt_template: str = DEFAULT_TEMPLATES["sft"], *,
               response_field: str = "response", **kw):
    template = PromptTemplate(prompt_template)
    if response_field in template.placeholders:
      raise ConfigError(f"task.prompt_template shows the response field {{{response_field}}} "
                        "in the prompt; the model would learn to copy it.")
    self.response_field = response_field
    super().__init__(tokenizer, template, **kw)

  def response_text(self, example):
    return _field(example, self.response_field, "response")

  def reference(self, example) -> str:
    return self.response_text(example)


class TranslationTask(Task):
  """Decoder-only translation: "{source}" in the prompt, target + eos as the response."""

  kind = "translation"
  FIELDS = ("source", "source_language", "target_language", "source_lang", "target_lang")

  def __init__(self, tokenizer, prompt_template: str = DEFAULT_TEMPLATES["translation"], *,
               src_lang: str = "en", tgt_lang: str = "fr", **kw):
    self.src_lang, self.tgt_lang = src_lang, tgt_lang
    super().__init__(tokenizer, PromptTemplate(prompt_template, required=("source",),
                                               allowed=self.FIELDS), **kw)

  def template_values(self, example):
    return {"source": _field(example, "source", "source"),
            "source_language": LANGUAGE_NAMES.get(self.src_lang, self.src_lang),
            "target_language": LANGUAGE_NAMES.get(self.tgt_lang, self.tgt_lang),
            "source_lang": self.src_lang, "target_lang": self.tgt_lang}

  def response_text(self, example):
    return _field(example, "target", "target")

  def reference(self, example) -> str:
    return self.response_text(example)


class ClassificationTask(Task):
  """Text classification: label_words mode (one-token label words scored by the LM head
  at the answer position) or head mode (a classification head on the final token)."""

  kind = "classification"
  needs_eos = False

  def __init__(self, tokenizer, label_names: Sequence[str],
               prompt_template: str = DEFAULT_TEMPLATES["classification"], *,
               mode: str = "label_words", label_words: Sequence[str] | None = None, **kw):
    _check_choice("task.mode", mode, MODES)
    self.label_names = tuple(str(n) for n in label_names)
    if len(self.label_names) < 2 or len(set(self.label_names)) != len(self.label_names):
      raise ConfigError(f"task.label_names must be at least two distinct labels; got "
                        f"{list(self.label_names)}.")
    self.mode = mode
    self.lm_style = mode == "label_words"
    super().__init__(tokenizer, PromptTemplate(prompt_template, required=("text",),
                                               allowed=("text",)), **kw)
    self.label_words = None
    self.label_token_ids = None  # int32 [num_labels]
    if mode == "label_words":
      self.label_words = tuple(label_words or ())
      if len(self.label_words) != len(self.label_names):
        raise ConfigError(f"task.label_words {list(self.label_words)} must give one word per "
                          f"label of {list(self.label_names)}.")
      ids = []
      for word, word_ids in zip(self.label_words,
                                _encode_many(tokenizer, list(self.label_words), special=False)):
        if len(word_ids) != 1:
          raise ConfigError(f"Label word {word!r} encodes to {len(word_ids)} tokens {word_ids}; "
                            "each label word must be exactly one token (try it with or "
                            "without a leading space).")
        ids.append(word_ids[0])
      if len(set(ids)) != len(ids):
        raise ConfigError(f"task.label_words {list(self.label_words)} map to the same token.")
      self.label_token_ids = np.asarray(ids, np.int32)

  @property
  def num_labels(self) -> int:
    return len(self.label_names)

  def template_values(self, example):
    return {"text": _field(example, "text", "text")}

  def label(self, example) -> int:
    label = example.get("label")
    if not isinstance(label, (int, np.integer)) or not 0 <= label < self.num_labels:
      raise ConfigError(f"Example label {label!r} is not a class index in [0, "
                        f"{self.num_labels}).")
    return int(label)

  def responses(self, examples):
    # The label word alone, no eos: the score is the label word's, and an eos target
    # would add a loss term that says nothing about the class.
    if self.mode == "head":
      return [[] for _ in examples]
    return [[int(self.label_token_ids[self.label(e)])] for e in examples]

  def response_text(self, example):
    return self.label_words[self.label(example)] if self.label_words else ""


def _check_messages(example: Mapping[str, Any]) -> list[dict]:
  messages = example.get("messages")
  if not isinstance(messages, list) or not messages:
    raise ConfigError(f"A chat example needs a non-empty list \"messages\"; got fields "
                      f"{sorted(example)}.")
  for m in messages:
    if (not isinstance(m, dict) or m.get("role") not in CHAT_ROLES
        or not isinstance(m.get("content"), str)):
      raise ConfigError(f"A chat message must be {{\"role\": one of {CHAT_ROLES}, "
                        f"\"content\": text}}; got {m!r}.")
  if not any(m["role"] == "assistant" for m in messages):
    raise ConfigError("A chat example has no assistant turn, so nothing to learn from.")
  return messages


class ChatTask(Task):
  """Chat fine-tuning: a conversation rendered with the tokenizer's chat template, loss on
  every assistant turn. The generation prompt for evaluation is the conversation before
  its last assistant turn, with the template's cue for a reply; the reference is that
  turn's content."""

  kind = "chat"
  needs_eos = False  # the template ends each turn with its own tokens

  def __init__(self, tokenizer, **kw):
    kw.pop("use_chat_template", None)
    super().__init__(tokenizer, PromptTemplate("{messages}"), use_chat_template=True, **kw)

  def _ids(self, messages, generation_prompt: bool) -> list[int]:
    text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt)
    return _encode_many(self.tokenizer, [text], special=False)[0]

  def encode_turns(self, example) -> tuple[list[int], list[bool]]:
    """(tokens of the whole conversation, True where a token is part of an assistant
    turn). Each turn's span is found by rendering the conversation up to it: the
    template must render a conversation's start the same whatever follows."""
    messages = _check_messages(example)
    tokens = self._ids(messages, False)
    mask = [False] * len(tokens)
    for k, message in enumerate(messages):
      if message["role"] != "assistant":
        continue
      before = self._ids(messages[:k], True) if k else []
      upto = self._ids(messages[:k + 1], False)
      if tokens[:len(upto)] != upto or upto[:len(before)] != before:
        raise ConfigError("The tokenizer's chat template renders a conversation's start "
                          "differently depending on what follows; assistant turns cannot "
                          "be located for the loss.")
      mask[len(before):len(upto)] = [True] * (len(upto) - len(before))
    return tokens, mask

  def _last_reply(self, example) -> int:
    messages = _check_messages(example)
    return max(k for k, m in enumerate(messages) if m["role"] == "assistant")

  def prompts(self, examples):
    return [self._ids(_check_messages(e)[:self._last_reply(e)], True) for e in examples]

  def response_text(self, example):
    return _check_messages(example)[self._last_reply(example)]["content"]

  def reference(self, example) -> str:
    return self.response_text(example)

  def context(self, example) -> list[dict]:
    """The messages before the last assistant turn (what a sampled reply answers)."""
    return _check_messages(example)[:self._last_reply(example)]


class SeqToSeqTask(Task):
  """Sequence to sequence on parallel text (module doc): no template, source ids =
  encode(source) + [eos], the response target + [eos]. `encoder_decoder` says which
  layout the batches take; an encoder-decoder's decoder starts from `bos_id`."""

  kind = "seq2seq"

  def __init__(self, tokenizer, *, src_lang: str = "en", tgt_lang: str = "fr",
               encoder_decoder: bool = False, eos_id: int | None = None):
    self.src_lang, self.tgt_lang = src_lang, tgt_lang
    self.encoder_decoder = bool(encoder_decoder)
    super().__init__(tokenizer, PromptTemplate(DEFAULT_TEMPLATES["seq2seq"]),
                     response_prefix="", eos_id=eos_id)
    self.bos_id = getattr(tokenizer, "bos_id", None)
    if self.encoder_decoder and self.bos_id is None:
      raise ConfigError(f"The {type(tokenizer).__name__} has no beginning-of-sequence id, "
                        "which an encoder-decoder's target starts from.")

  def prompts(self, examples):
    """The source ids: the sentence's own tokens (no specials), then eos."""
    sources = [_field(e, "source", "source") for e in examples]
    return [ids + [self.eos_id] for ids in _encode_many(self.tokenizer, sources, special=False)]

  def response_text(self, example):
    return _field(example, "target", "target")

  def reference(self, example) -> str:
    return self.response_text(example)


def _check_seq2seq_config(config) -> None:
  if config.kind != "seq2seq":
    if config.vocab_size is not None:
      raise ConfigError(f"task.vocab_size trains a seq2seq task's vocabulary; the "
                        f"{config.kind} task uses its model's: leave it None.")
    return
  for field in ("prompt_template", "response_prefix"):
    if config[field] is not None:
      raise ConfigError(f"task.{field} is set, but a seq2seq task has no prompt (the source "
                        "sentence is the input as it is): leave it None.")
  if config.use_chat_template:
    raise ConfigError("task.use_chat_template=True, but a seq2seq task has no prompt to wrap: "
                      "set it False.")
  _check_choice("task.spm_model_type", config.spm_model_type, SPM_MODEL_TYPES)


def train_vocabulary(task_config, seed: int = 0) -> tokenizers.SentencePieceTokenizer:
  """A seq2seq run's joint vocabulary: task.vocab_size SentencePiece pieces (model type
  task.spm_model_type) learnt from the train split's sources and targets together, one
  sentence each, in memory (nothing is written). The same data and settings give the
  same vocabulary."""
  config = with_defaults(task_config)
  _check_choice("task.kind", config.kind, KINDS)
  if config.kind != "seq2seq":
    raise ConfigError(f"a {config.kind} task uses its model's vocabulary; only seq2seq trains "
                      "one.")
  _check_seq2seq_config(config)
  if config.vocab_size is None:
    raise ConfigError("task.vocab_size is not set: a seq2seq run from scratch trains a joint "
                      "vocabulary of that many pieces (e.g. 8000); or set config.init_from.")
  _check_source(config)
  raw = load_examples(config, config.train_split, config.max_train_examples)
  sentences = [_field(e, "source", "source") for e in raw] + [
      _field(e, "target", "target") for e in raw]
  tokenizer = tokenizers.SentencePieceTokenizer.train_on_sentences(
      sentences, config.vocab_size, seed=seed, model_type=config.spm_model_type,
      **tokenizers.SENTENCE_OPTIONS)
  logging.info("Trained a %d-piece %s vocabulary on %d %s+%s sentences of %s:%s.",
               tokenizer.vocab_size, config.spm_model_type, len(sentences), config.src_lang,
               config.tgt_lang, config.source, config.train_split)
  return tokenizer


def make_task(task_config, tokenizer, encoder_decoder: bool = False) -> Task:
  """The task a config describes; every setting is checked here, before data is read.
  `encoder_decoder` (seq2seq only): batches for an encoder-decoder model."""
  config = with_defaults(task_config)
  _check_choice("task.kind", config.kind, KINDS)
  _check_seq2seq_config(config)
  if encoder_decoder and config.kind != "seq2seq":
    raise ConfigError(f"an encoder-decoder (model.encoder_layers > 0) trains on a seq2seq "
                      f"task; task.kind is {config.kind!r}: set it to 'seq2seq'.")
  if config.kind == "seq2seq":
    return SeqToSeqTask(tokenizer, src_lang=config.src_lang, tgt_lang=config.tgt_lang,
                        encoder_decoder=encoder_decoder, eos_id=config.eos_id)
  template = config.prompt_template or DEFAULT_TEMPLATES[config.kind]
  common = dict(use_chat_template=config.use_chat_template,
                response_prefix=config.response_prefix, eos_id=config.eos_id)
  if config.kind == "sft":
    return SFTTask(tokenizer, template, response_field=config.response_field, **common)
  if config.kind == "translation":
    return TranslationTask(tokenizer, template, src_lang=config.src_lang,
                           tgt_lang=config.tgt_lang, **common)
  if config.kind == "chat":
    return ChatTask(tokenizer, eos_id=config.eos_id, response_prefix=config.response_prefix)
  return ClassificationTask(tokenizer, config.label_names, template, mode=config.mode,
                            label_words=config.label_words, **common)


# ----------------------------------------------------------------------------- examples


@dataclasses.dataclass
class EncodedExamples:
  """Token sequences of one split after truncation, ready to batch."""

  tokens: list[np.ndarray]  # Each int32 [n]: prompt + response.
  prompt_lens: np.ndarray  # int32 [count]
  labels: np.ndarray  # int32 [count]; 0 when the task has none.
  lm_style: bool
  stats: dict[str, int]
  # Chat: each bool [n], True where the token carries loss (as a target); None: every
  # token from prompt_lens on does.
  loss_masks: list[np.ndarray] | None = None
  # Encoder-decoder: each int32 [s], the source ids (tokens then hold [bos] + target +
  # [eos], prompt_lens 1); None for decoder-only batches.
  sources: list[np.ndarray] | None = None

  @property
  def lengths(self) -> np.ndarray:
    """Input length of each example, int32 [count]: n - 1 for LM-style, else n; with
    sources, the longer of the source and the decoder's inputs (one bucket for both)."""
    lengths = np.asarray([len(t) - self.lm_style for t in self.tokens], np.int32)
    if self.sources is not None:
      lengths = np.maximum(lengths, np.asarray([len(s) for s in self.sources], np.int32))
    return lengths

  def __len__(self) -> int:
    return len(self.tokens)


def fit_length(prompt: Sequence[int], response: Sequence[int], max_length: int,
               lm_style: bool = True) -> tuple[list[int], list[int]] | None:
  """Cuts the prompt from the left so the inputs fit max_length; None when even the
  response (with one prompt token before it) does not fit."""
  prompt, response = list(prompt), list(response)
  room = max_length + 1 if lm_style else max_length  # Tokens in prompt + response.
  if len(prompt) + len(response) <= room:
    return prompt, response
  keep = room - len(response)
  if keep < 1:
    return None
  return prompt[-keep:], response


def encode_examples(task: Task, examples: Sequence[Mapping[str, Any]], max_length: int,
                    name: str = "examples") -> EncodedExamples:
  """Tokenizes, truncates (counting it) and stores one split."""
  if max_length < 2:
    raise ConfigError(f"task.max_length must be at least 2; got {max_length}.")
  if isinstance(task, ChatTask):
    return _encode_chats(task, examples, max_length, name)
  if isinstance(task, SeqToSeqTask) and task.encoder_decoder:
    return _encode_pairs(task, examples, max_length, name)
  labels = ([task.label(e) for e in examples] if isinstance(task, ClassificationTask)
            else [0] * len(examples))
  tokens, prompt_lens, kept_labels = [], [], []
  truncated = dropped = 0
  for (prompt, response), label in zip(task.encode_all(examples), labels):
    if not prompt:
      raise ConfigError(f"A prompt of {name} encodes to no tokens; the template must "
                        "produce text.")
    fitted = fit_length(prompt, response, max_length, task.lm_style)
    if fitted is None:
      dropped += 1
      continue
    truncated += len(fitted[0]) < len(prompt)
    tokens.append(np.asarray(fitted[0] + fitted[1], np.int32))
    prompt_lens.append(len(fitted[0]))
    kept_labels.append(label)
  stats = {"examples": len(examples), "kept": len(tokens), "truncated": truncated,
           "dropped": dropped}
  log = logging.warning if truncated or dropped else logging.info
  log("Task %s: %d examples, %d prompts cut from the left and %d dropped (response longer "
      "than max_length=%d).", name, len(examples), truncated, dropped, max_length)
  return EncodedExamples(tokens, np.asarray(prompt_lens, np.int32),
                         np.asarray(kept_labels, np.int32), task.lm_style, stats)


def _encode_chats(task: "ChatTask", examples, max_length: int, name: str) -> EncodedExamples:
  """Conversations cut from the right to max_length + 1 tokens (a conversation's start is
  where its template begins); dropped when no assistant token is left."""
  tokens, masks = [], []
  truncated = dropped = 0
  for example in examples:
    ids, mask = task.encode_turns(example)
    if len(ids) > max_length + 1:
      ids, mask = ids[:max_length + 1], mask[:max_length + 1]
      truncated += 1
    if not any(mask[1:]):
      dropped += 1
      continue
    tokens.append(np.asarray(ids, np.int32))
    masks.append(np.asarray(mask, bool))
  stats = {"examples": len(examples), "kept": len(tokens), "truncated": truncated,
           "dropped": dropped}
  logging.info("Task %s: %d conversations, %d cut from the right at max_length=%d, %d "
               "dropped (no assistant token left).", name, len(examples), truncated,
               max_length, dropped)
  count = len(tokens)
  return EncodedExamples(tokens, np.ones(count, np.int32), np.zeros(count, np.int32), True,
                         stats, masks)


def _cut_source(source: list[int], max_length: int, eos_id: int) -> list[int]:
  """A source of at most max_length ids that still ends with eos (cut from the right:
  the encoder reads a sentence from its start)."""
  return source if len(source) <= max_length else source[:max_length - 1] + [eos_id]


def _encode_pairs(task: "SeqToSeqTask", examples, max_length: int, name: str) -> EncodedExamples:
  """Encoder-decoder examples: sources cut to max_length (counted); a pair whose target +
  eos exceeds max_length is dropped."""
  tokens, sources = [], []
  truncated = dropped = 0
  for source, response in task.encode_all(examples):  # response: target + [eos]
    if len(response) > max_length:
      dropped += 1
      continue
    cut = _cut_source(source, max_length, task.eos_id)
    truncated += len(cut) < len(source)
    # inputs = seq[:-1] = [bos] + target, targets = seq[1:] = target + [eos].
    tokens.append(np.asarray([task.bos_id] + response, np.int32))
    sources.append(np.asarray(cut, np.int32))
  stats = {"examples": len(examples), "kept": len(tokens), "truncated": truncated,
           "dropped": dropped}
  log = logging.warning if truncated or dropped else logging.info
  log("Task %s: %d pairs, %d sources cut from the right and %d dropped (target longer "
      "than max_length=%d).", name, len(examples), truncated, dropped, max_length)
  count = len(tokens)
  return EncodedExamples(tokens, np.ones(count, np.int32), np.zeros(count, np.int32), True,
                         stats, sources=sources)


# ----------------------------------------------------------------------------- batches


def bucket_lengths(max_length: int, buckets: Sequence[int] | None = None) -> tuple[int, ...]:
  """Pad lengths: `buckets` (ascending) or powers of two from 16, ending at max_length."""
  if buckets is None:
    buckets = [2**k for k in range(4, max(4, math.ceil(math.log2(max_length))))]
  buckets = [int(b) for b in buckets]
  if (any(b < 1 or b > max_length for b in buckets) or buckets != sorted(set(buckets))):
    raise ConfigError(f"task.buckets must be ascending lengths in [1, max_length="
                      f"{max_length}]; got {buckets}.")
  return tuple(buckets) if buckets and buckets[-1] == max_length else (*buckets, max_length)


def _bucket(buckets: Sequence[int], length: int) -> int:
  return buckets[int(np.searchsorted(buckets, length))]  # Smallest bucket >= length.


def collate(data: EncodedExamples, ids: np.ndarray, length: int, pad_id: int,
            label_words: bool) -> dict[str, np.ndarray]:
  """Rows `ids` [B] (-1: a padding row) padded to `length`; formats in the module doc."""
  rows = len(ids)
  inputs = np.full((rows, length), pad_id, np.int32)  # [B, L]
  labels = np.zeros(rows, np.int32)  # [B]
  if data.lm_style:
    targets = np.full((rows, length), pad_id, np.int32)  # [B, L]
    weights = np.zeros((rows, length), np.float32)  # [B, L]
    answer_index = np.zeros(rows, np.int32)  # [B]
    for row, i in enumerate(ids):
      if i < 0:
        continue
      seq, p = data.tokens[i], data.prompt_lens[i]
      n = len(seq) - 1
      inputs[row, :n], targets[row, :n] = seq[:-1], seq[1:]
      if data.loss_masks is not None:  # chat: the assistant turns' tokens
        weights[row, :n] = data.loss_masks[i][1:]
      else:  # targets[j] = seq[j + 1] is a response token iff j >= p-1
        weights[row, p - 1:n] = 1.0
      labels[row], answer_index[row] = data.labels[i], p - 1
    batch = {"inputs": inputs, "targets": targets, "weights": weights}
    if label_words:
      batch.update(labels=labels, answer_index=answer_index)
    if data.sources is not None:
      source = np.full((rows, length), pad_id, np.int32)  # [B, L]
      # 1 on padding rows: every query then attends to at least one key.
      source_lengths = np.ones(rows, np.int32)  # [B]
      for row, i in enumerate(ids):
        if i >= 0:
          source_lengths[row] = len(data.sources[i])
          source[row, :source_lengths[row]] = data.sources[i]
      batch.update(source=source, source_lengths=source_lengths)
    return batch
  last_index = np.zeros(rows, np.int32)  # [B]
  row_weights = np.zeros(rows, np.float32)  # [B]
  for row, i in enumerate(ids):
    if i < 0:
      continue
    seq = data.tokens[i]
    inputs[row, :len(seq)] = seq
    last_index[row], labels[row], row_weights[row] = len(seq) - 1, data.labels[i], 1.0
  return {"inputs": inputs, "last_index": last_index, "labels": labels,
          "weights": row_weights}


@dataclasses.dataclass(frozen=True, eq=False)
class _TrainBatch:
  """map fn: step -> this process's rows of the global batch, from (seed, epoch) alone."""

  data: EncodedExamples
  lengths: np.ndarray  # int32 [count]
  global_batch_size: int
  window: int  # Batches per length-sorting window.
  seed: int
  buckets: tuple[int, ...]
  pad_id: int
  label_words: bool
  rows: slice
  _plans: dict = dataclasses.field(default_factory=dict)  # {epoch: plan}, the latest one.

  @property
  def batches_per_epoch(self) -> int:
    return len(self.lengths) // self.global_batch_size

  def epoch_plan(self, epoch: int) -> np.ndarray:
    """Example ids of every global batch of `epoch`, int [batches_per_epoch, global]."""
    plan = self._plans.get(epoch)
    if plan is not None:
      return plan
    rng = np.random.default_rng([self.seed, epoch])
    count = self.batches_per_epoch * self.global_batch_size
    order = rng.permutation(len(self.lengths))[:count]  # The rest sit this epoch out.
    size = self.window * self.global_batch_size
    groups = []
    for start in range(0, count, size):  # Similar lengths batch together within a window.
      group = order[start:start + size]
      groups.append(group[np.argsort(self.lengths[group], kind="stable")])
    plan = np.concatenate(groups).reshape(-1, self.global_batch_size)
    plan = plan[rng.permutation(len(plan))]  # No long-then-short drift within an epoch.
    self._plans.clear()
    self._plans[epoch] = plan
    return plan

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    epoch, index = divmod(int(step), self.batches_per_epoch)
    ids = self.epoch_plan(epoch)[index]  # [global_batch]
    # The global batch's longest example picks the length, so every process agrees.
    length = _bucket(self.buckets, int(self.lengths[ids].max()))
    return collate(self.data, ids[self.rows], length, self.pad_id, self.label_words)


def eval_batch_list(data: EncodedExamples, global_batch: int, rows: slice,
                    buckets: Sequence[int], pad_id: int, label_words: bool) -> list[dict]:
  """Fixed batches of every example (sorted by length), the last padded with weight-0 rows."""
  lengths = data.lengths
  order = np.argsort(lengths, kind="stable")
  num_batches = math.ceil(len(order) / global_batch)
  padded = np.full(num_batches * global_batch, -1, np.int64)
  padded[:len(order)] = order
  batches = []
  for b in range(num_batches):
    ids = padded[b * global_batch:(b + 1) * global_batch]  # [global_batch]
    length = _bucket(buckets, int(lengths[ids[ids >= 0]].max()))
    batch = collate(data, ids[rows], length, pad_id, label_words)
    for array in batch.values():
      array.flags.writeable = False  # Shared across calls; nobody may change them.
    batches.append(batch)
  return batches


# ----------------------------------------------------------------------------- datasets


@dataclasses.dataclass
class EvalSet:
  split: str
  batch_list: list[dict[str, np.ndarray]] = dataclasses.field(repr=False)
  # For generation/accuracy: dicts with prompt_ids (int32 [p], cut from the left to
  # max_length) and reference (translation, sft) or text and label (classification);
  # an encoder-decoder's: source_ids (int32 [s], cut from the right to max_length, ending
  # with eos), reference and source.
  examples: list[dict[str, Any]] = dataclasses.field(repr=False)
  stats: dict[str, int]


@dataclasses.dataclass
class TaskDatasets:
  task: Task
  # next() -> a batch of the module doc's format; get_state()/set_state() resume exactly.
  train_iter: grain.DatasetIterator
  eval_sets: dict[str, EvalSet]  # By split; the first is the main one.
  buckets: tuple[int, ...]
  steps_per_epoch: int
  pad_id: int
  train_stats: dict[str, int]

  @property
  def eval_split(self) -> str:
    return next(iter(self.eval_sets))

  def eval_batches(self, split: str | None = None) -> Iterator[dict[str, np.ndarray]]:
    """The same (read-only) batches every call; padding rows have weight 0."""
    for batch in self.eval_sets[split or self.eval_split].batch_list:
      yield dict(batch)

  @property
  def num_eval_batches(self) -> int:
    return len(self.eval_sets[self.eval_split].batch_list)

  @property
  def eval_examples(self) -> list[dict[str, Any]]:
    return self.eval_sets[self.eval_split].examples


def head_labels(task_config) -> int:
  """Classes of a run's classification head (config.task), 0 when it has none."""
  if task_config is None or task_config.kind != "classification" or task_config.mode != "head":
    return 0
  return len(task_config.label_names)


def with_defaults(task_config) -> ml_collections.ConfigDict:
  """Copies the fields this module reads; ones `task_config` lacks take their defaults."""
  return fill_defaults(task_config, default_task_config())


def _check_source(config) -> None:
  if not config.source:
    raise ConfigError("task.source is not set: give a directory (in the layout of Multi30k "
                      "or SST-2) or a tfds catalog name (like wmt14_translate/fr-en or "
                      "glue/sst2).")


def _split_names(config) -> list[str] | None:
  """The local data's splits (None for a catalog dataset)."""
  if chat_corpora.is_corpus(config.source):
    return list(chat_corpora.SPLITS)
  if not task_sources.is_local(config.source):
    return None
  if config.kind == "classification":
    return sorted(task_sources.tsv_files(config.source))
  if config.kind in ("sft", "chat") and task_sources.has_jsonl(config.source,
                                                             config.train_split):
    return task_sources.jsonl_splits(config.source)
  if config.kind == "chat":
    raise NotFound(f"{config.source} holds no {config.train_split}.jsonl[.gz]: a chat "
                   "task reads {split}.jsonl files of {\"messages\": [...]} objects, or "
                   f"task.source={chat_corpora.CHITCHAT!r}")
  return sorted(task_sources.parallel_files(config.source, config.src_lang, config.tgt_lang))


def _eval_splits(config) -> list[str]:
  if config.eval_split:
    return [s.strip() for s in config.eval_split.split(",") if s.strip()]
  names = _split_names(config)
  if names is None:
    return ["validation"]
  found = next((s for s in EVAL_SPLIT_NAMES if s in names), None)
  if found is None:
    raise ConfigError(f"task.eval_split is not set and {config.source} has none of the splits "
                      f"{EVAL_SPLIT_NAMES} (it has {names}); set task.eval_split.")
  return [found]


def load_examples(config, split: str, max_examples: int | None) -> list[dict]:
  """Raw examples of one split as the task kind reads them."""
  common = dict(data_dir=config.tfds_data_dir, max_examples=max_examples)
  if config.kind == "chat":
    if chat_corpora.is_corpus(config.source):
      return chat_corpora.load(config.source, split, max_examples=max_examples)
    if not task_sources.is_local(config.source):
      raise ConfigError(f"a chat task reads a directory of {{split}}.jsonl files or "
                        f"{chat_corpora.CHITCHAT!r}; got task.source={config.source!r}")
    return task_sources.load_jsonl(config.source, split, max_examples=max_examples)
  if config.kind == "classification":
    return task_sources.load_labelled(config.source, split, config.label_names,
                                      label_field=config.label_field,
                                      text_field=config.text_field, **common)
  if (config.kind == "sft" and task_sources.is_local(config.source)
      and task_sources.has_jsonl(config.source, config.train_split)):
    return task_sources.load_jsonl(config.source, split, max_examples=max_examples)
  # sft on parallel data sees fields "source" and "target".
  return task_sources.load_parallel(config.source, split, config.src_lang, config.tgt_lang,
                                    **common)


def _eval_examples(task: Task, examples: list[dict], max_length: int) -> list[dict]:
  prompts = task.prompts(examples)
  out = []
  for example, prompt in zip(examples, prompts):
    if isinstance(task, SeqToSeqTask) and task.encoder_decoder:
      out.append({"source_ids": np.asarray(_cut_source(prompt, max_length, task.eos_id),
                                           np.int32),  # [<= max_length]
                  "reference": task.reference(example), "source": example["source"]})
      continue
    item = {"prompt_ids": np.asarray(prompt[-max_length:], np.int32)}  # [<= max_length]
    if isinstance(task, ClassificationTask):
      item.update(text=example["text"], label=task.label(example))
    else:
      item.update(reference=task.reference(example))
      if isinstance(task, (TranslationTask, SeqToSeqTask)):
        item["source"] = example["source"]
      if isinstance(task, ChatTask):
        item["context"] = task.context(example)
    out.append(item)
  return out


def make_eval_set(task: Task, raw: list[dict], where: str, *, split: str, max_length: int,
                  eval_batch_size: int, rows: slice, buckets: Sequence[int],
                  pad_id: int) -> EvalSet:
  """Loss batches and generation/classification examples of raw eval examples."""
  encoded = encode_examples(task, raw, max_length, where)
  if not len(encoded):
    raise ConfigError(f"{where} has no usable eval examples.")
  label_words = isinstance(task, ClassificationTask) and task.mode == "label_words"
  return EvalSet(split=split,
                 batch_list=eval_batch_list(encoded, eval_batch_size, rows, buckets, pad_id,
                                            label_words),
                 examples=_eval_examples(task, raw, max_length), stats=encoded.stats)


def _pad_id(config, task: Task, tokenizer) -> int:
  # seq2seq: the vocabulary's own padding id where it has one (train_vocabulary's does).
  vocab_pad = getattr(tokenizer, "pad_id", None) if isinstance(task, SeqToSeqTask) else None
  pad_id = next(i for i in (config.pad_id, vocab_pad, task.eos_id, 0) if i is not None)
  if not 0 <= pad_id < tokenizer.vocab_size:
    raise ConfigError(f"task.pad_id {pad_id} is outside the vocabulary "
                      f"[0, {tokenizer.vocab_size}).")
  return pad_id


def eval_only_datasets(task_config, tokenizer, *, encoder_decoder: bool = False
                       ) -> TaskDatasets:
  """The task, buckets and padding of make_task_datasets without reading any split: for
  scoring examples from elsewhere (evaluate's --source_file), where the run's own data
  need not be on the machine. No train iterator and no eval sets."""
  config = with_defaults(task_config)
  task = make_task(config, tokenizer, encoder_decoder)
  return TaskDatasets(task=task, train_iter=None, eval_sets={},
                      buckets=bucket_lengths(config.max_length, config.buckets),
                      steps_per_epoch=0, pad_id=_pad_id(config, task, tokenizer),
                      train_stats={})


def make_task_datasets(
    task_config,
    tokenizer,
    *,
    global_batch_size: int,
    eval_batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    encoder_decoder: bool = False,
) -> TaskDatasets:
  """Task, training iterator and eval sets for the trainer; bad settings fail first.
  `encoder_decoder` (a seq2seq task for model.encoder_layers > 0): batches with a source
  (module doc)."""
  config = with_defaults(task_config)
  task = make_task(config, tokenizer, encoder_decoder)
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, {process_count}).")
  if not 0 <= seed < 2**32:
    raise ConfigError(f"seed must lie in [0, 2**32); got {seed}.")
  if config.max_length < 2:
    raise ConfigError(f"task.max_length must be at least 2; got {config.max_length}.")
  if config.bucket_window < 1:
    raise ConfigError(f"task.bucket_window must be positive; got {config.bucket_window}.")
  train_rows = _process_rows("global_batch_size", global_batch_size, process_index,
                             process_count)
  eval_rows = _process_rows("eval_batch_size", eval_batch_size, process_index, process_count)
  buckets = bucket_lengths(config.max_length, config.buckets)
  pad_id = _pad_id(config, task, tokenizer)
  _check_source(config)
  eval_splits = _eval_splits(config)
  label_words = isinstance(task, ClassificationTask) and task.mode == "label_words"

  train = encode_examples(task, load_examples(config, config.train_split,
                                              config.max_train_examples),
                          config.max_length, f"{config.source}:{config.train_split}")
  if len(train) < global_batch_size:
    raise ConfigError(f"{config.source}:{config.train_split} has {len(train)} usable examples "
                      f"(of {train.stats['examples']}), fewer than one global batch of "
                      f"{global_batch_size}.")
  batch_fn = _TrainBatch(train, train.lengths, global_batch_size, config.bucket_window, seed,
                         buckets, pad_id, label_words, train_rows)
  steps = grain.MapDataset.range(sys.maxsize).map(batch_fn)  # Element s is step s.

  eval_sets = {}
  for split in eval_splits:
    raw = load_examples(config, split, config.max_eval_examples)
    eval_sets[split] = make_eval_set(task, raw, f"{config.source}:{split}", split=split,
                                     max_length=config.max_length, eval_batch_size=eval_batch_size,
                                     rows=eval_rows, buckets=buckets, pad_id=pad_id)
  logging.info("Task %s on %s: %d train examples (%d steps per epoch), eval %s, buckets %s.",
               task.kind, config.source, len(train), batch_fn.batches_per_epoch,
               {s: len(e.examples) for s, e in eval_sets.items()}, buckets)
  return TaskDatasets(task=task, train_iter=iter(steps.to_iter_dataset(_READ_OPTIONS)),
                      eval_sets=eval_sets, buckets=buckets,
                      steps_per_epoch=batch_fn.batches_per_epoch, pad_id=pad_id,
                      train_stats=train.stats)
