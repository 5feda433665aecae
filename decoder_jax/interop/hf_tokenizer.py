"""A Hugging Face `tokenizer.json` tokenizer with the interface of decoder_jax.data.tokenizers.

`HFTokenizer.load(directory)` reads a model directory as transformers writes it:
`tokenizer.json` (the `tokenizers` library's format), `tokenizer_config.json` (special
tokens, chat template), and optionally `chat_template.jinja` (transformers v5 keeps the
template there), `generation_config.json` and `config.json` (token ids).
"""

from __future__ import annotations

import datetime
import functools
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from decoder_jax.errors import ConfigError, NotFound

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG_FILE = "generation_config.json"
MODEL_CONFIG_FILE = "config.json"


def _read_json(path: epath.Path) -> dict[str, Any]:
  return json.loads(path.read_text()) if path.exists() else {}


def _token_text(token) -> str | None:
  """A special token as tokenizer_config.json stores it: a string or an AddedToken dict."""
  if isinstance(token, Mapping):
    return token.get("content")
  return token


def _as_id_list(value) -> list[int]:
  if value is None:
    return []
  return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _tojson(value, indent=None, separators=None, sort_keys=False, ensure_ascii=False):
  # transformers' chat templates expect plain json.dumps (jinja's own tojson HTML-escapes).
  return json.dumps(value, indent=indent, separators=separators, sort_keys=sort_keys,
                    ensure_ascii=ensure_ascii)


def _raise_exception(message):
  raise ConfigError(f"chat template: {message}")


@functools.lru_cache(maxsize=None)
def _template_environment():
  import jinja2
  import jinja2.ext
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  class GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers marks assistant text with it
    to build training masks); here it just renders its body."""
    tags = {"generation"}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
      return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
      return caller()

  # The settings transformers renders chat templates with, so templates written for it
  # produce the same text here.
  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[jinja2.ext.loopcontrols, GenerationTag])
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  return env


class HFTokenizer:
  """Wraps a `tokenizers.Tokenizer`; `encode` / `decode` / `vocab_size` / `eos_id` / `bos_id`
  as the other tokenizers, plus `apply_chat_template`."""

  def __init__(self, tokenizer_json: str, tokenizer_config: Mapping[str, Any] | None = None,
               *, chat_template: str | None = None,
               generation_config: Mapping[str, Any] | None = None,
               model_config: Mapping[str, Any] | None = None):
    """The contents of tokenizer.json, and the dicts of the other files (all optional)."""
    from tokenizers import Tokenizer  # imported here: only HF interop needs `tokenizers`
    self._tokenizer = Tokenizer.from_str(tokenizer_json)
    self._config = dict(tokenizer_config or {})
    template = chat_template or self._config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
      template = {t["name"]: t["template"] for t in template}.get("default")
    self._chat_template = template
    self._bos_id, self._eos_ids = self._special_ids(generation_config or {}, model_config or {})

  @classmethod
  def load(cls, directory: str | os.PathLike) -> HFTokenizer:
    directory = epath.Path(directory)
    if not (directory / TOKENIZER_FILE).exists():
      raise NotFound(f"{directory / TOKENIZER_FILE} does not exist (a Hugging Face "
                     "fast tokenizer is needed; slow-only tokenizers are not read)")
    config = _read_json(directory / TOKENIZER_CONFIG_FILE)
    template_path = directory / CHAT_TEMPLATE_FILE
    template = template_path.read_text() if template_path.exists() else None
    return cls((directory / TOKENIZER_FILE).read_text(), config, chat_template=template,
               generation_config=_read_json(directory / GENERATION_CONFIG_FILE),
               model_config=_read_json(directory / MODEL_CONFIG_FILE))

  def _special_ids(self, generation: Mapping, model: Mapping) -> tuple[int | None, list[int]]:
    """BOS and EOS ids: the tokenizer's own special tokens first (as transformers'
    tokenizer.eos_token_id), then generation_config.json, then config.json."""
    def id_of(key):
      text = _token_text(self._config.get(key))
      return None if text is None else self._tokenizer.token_to_id(text)

    if "bos_token" in self._config:  # present but null: the tokenizer has no BOS
      bos = id_of("bos_token")
    else:
      bos = next(iter(_as_id_list(generation.get("bos_token_id"))
                      + _as_id_list(model.get("bos_token_id"))), None)
    eos = [id_of("eos_token")] + _as_id_list(generation.get("eos_token_id"))
    eos += _as_id_list(model.get("eos_token_id"))
    return bos, list(dict.fromkeys(i for i in eos if i is not None))  # ordered, deduplicated

  def save(self, directory: str | os.PathLike) -> None:
    """Writes tokenizer.json, tokenizer_config.json and generation_config.json (the ids)."""
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / TOKENIZER_FILE).write_text(self._tokenizer.to_str())
    config = dict(self._config)
    if self._chat_template is not None:
      config["chat_template"] = self._chat_template
    (directory / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, ensure_ascii=False,
                                                              indent=1))
    ids = {"bos_token_id": self._bos_id, "eos_token_id": self._eos_ids}
    (directory / GENERATION_CONFIG_FILE).write_text(json.dumps(ids, indent=1))

  @property
  def vocab_size(self) -> int:
    return self._tokenizer.get_vocab_size(with_added_tokens=True)

  @property
  def bos_id(self) -> int | None:
    return self._bos_id

  @property
  def eos_id(self) -> int | None:
    return self._eos_ids[0] if self._eos_ids else None

  @property
  def eos_ids(self) -> list[int]:
    """Every end-of-sequence id (chat models often stop on several, e.g. end-of-turn too)."""
    return list(self._eos_ids)

  @property
  def chat_template(self) -> str | None:
    return self._chat_template

  @property
  def backend(self):
    """The wrapped `tokenizers.Tokenizer`, for vocabulary-level queries (e.g. the bytes
    of each token, for stop strings)."""
    return self._tokenizer

  def token_to_id(self, token: str) -> int | None:
    return self._tokenizer.token_to_id(token)

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    """Ids of `text`; add_special_tokens runs the tokenizer's post-processor (e.g. a
    leading BOS), as transformers does by default."""
    return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

  def encode_array(self, text: str, add_special_tokens: bool = True) -> np.ndarray:
    return np.asarray(self.encode(text, add_special_tokens), dtype=np.int32)

  def encode_batch(self, texts: Iterable[str], add_special_tokens: bool = True) -> list[list[int]]:
    encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=add_special_tokens)
    return [e.ids for e in encodings]

  def decode(self, ids, skip_special_tokens: bool = False) -> str:
    # Special tokens are kept by default, as in transformers (tokenizers drops them).
    ids = np.asarray(ids, dtype=np.int64).reshape(-1).tolist()
    return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

  def apply_chat_template(self, messages: Sequence[Mapping[str, Any]],
                          add_generation_prompt: bool = True, **template_vars) -> str:
    """Renders the chat template: `messages` ([{"role", "content"}, ...]) to prompt text.

    The template sees `messages`, `add_generation_prompt`, the special tokens
    (`bos_token`, `eos_token`, ...) and any `template_vars` (e.g. tools=...). Encode the
    result with add_special_tokens=False: the template writes BOS itself where it wants.
    """
    if self._chat_template is None:
      raise ConfigError("this tokenizer has no chat_template (tokenizer_config.json / "
                        f"{CHAT_TEMPLATE_FILE})")
    special = {key: _token_text(value) for key, value in self._config.items()
               if key.endswith("_token") and isinstance(value, (str, Mapping))}
    template = _template_environment().from_string(self._chat_template)
    context = {**special, "tools": None, "documents": None, **template_vars}
    return template.render(**context, messages=list(messages),
                           add_generation_prompt=add_generation_prompt)
