"""Stop strings of any length, checked on token ids inside a jitted decode loop.

A stop string may span several tokens, start in the middle of one and end in the middle
of another, so it cannot be matched on ids directly. Instead each string gets a KMP-style
automaton over the BYTES of the decoded text, whose state is how many bytes of the string
are matched so far (the longest prefix of the string that is a suffix of the text). The
effect of a whole token on that state is precomputed on the host for every (string,
state, token), so a decode step advances it with one gather.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from decoder_jax.errors import ConfigError

_SPM_SPACE = "\u2581"  # SentencePiece's "▁", which stands for a space


# --- the bytes of each token ------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
  """Character -> byte of GPT-2's byte-level BPE, which spells every byte as a printable
  character: printable Latin-1 bytes stand for themselves, the other 68 bytes are moved,
  in order, to code points 256 and up."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
               *range(ord("\xae"), ord("\xff") + 1)]
  char_of = {b: chr(b) for b in printable}
  moved = [b for b in range(256) if b not in char_of]
  char_of.update({b: chr(256 + n) for n, b in enumerate(moved)})
  return {c: b for b, c in char_of.items()}


@functools.lru_cache(maxsize=1)
def _byte_level_translation() -> dict[int, str]:
  """For str.translate: each alphabet character -> the Latin-1 character of its byte."""
  return {ord(c): chr(b) for c, b in _byte_level_alphabet().items()}


def _byte_level_token(token: str) -> bytes:
  try:  # the fast path: every character is in the alphabet
    return token.translate(_byte_level_translation()).encode("latin-1")
  except UnicodeEncodeError:  # a character outside it stands for its own UTF-8
    alphabet = _byte_level_alphabet()
    return b"".join(bytes([alphabet[c]]) if c in alphabet else c.encode("utf-8")
                    for c in token)


def _is_byte_level(decoder_json: dict | None) -> bool:
  if not decoder_json:
    return False
  if decoder_json.get("type") == "Sequence":
    parts = decoder_json.get("decoders") or []
    return bool(parts) and all(p.get("type") == "ByteLevel" for p in parts)
  return decoder_json.get("type") == "ByteLevel"


def _hf_token_bytes(tokenizer) -> list[bytes]:
  backend = tokenizer.backend  # a tokenizers.Tokenizer
  vocab_size = tokenizer.vocab_size
  decoder = backend.decoder
  decoder_json = None if decoder is None else json.loads(decoder.__getstate__())
  if not _is_byte_level(decoder_json):
    # Other decoders (Metaspace, WordPiece, ...) are asked token by token; a decoder that
    # strips a leading space from the text loses it here too.
    texts = backend.decode_batch([[i] for i in range(vocab_size)], skip_special_tokens=False)
    return [text.encode("utf-8") for text in texts]
  out = [b""] * vocab_size
  for token, index in backend.get_vocab(with_added_tokens=False).items():
    if 0 <= index < vocab_size:
      out[index] = _byte_level_token(token)
  for index, added in backend.get_added_tokens_decoder().items():
    if 0 <= index < vocab_size:  # added and special tokens decode as their own text
      out[index] = added.content.encode("utf-8")
  return out


def _sentencepiece_token_bytes(tokenizer) -> list[bytes]:
  processor = tokenizer.processor
  out = []
  for index in range(tokenizer.vocab_size):
    piece = processor.id_to_piece(index)
    if processor.is_control(index) or processor.is_unknown(index):
      out.append(b"")
    elif processor.is_byte(index):  # byte fallback: "<0x0A>"
      out.append(bytes([int(piece[3:-1], 16)]))
    else:
      out.append(piece.replace(_SPM_SPACE, " ").encode("utf-8"))
  return out


def token_bytes(tokenizer) -> list[bytes]:
  """The bytes each token id contributes to the decoded text (index = id, len =
  tokenizer.vocab_size): what the stop-string automaton reads, since a token need not
  decode to whole characters on its own."""
  from decoder_jax.data.tokenizers import CharTokenizer, SentencePieceTokenizer

  if isinstance(tokenizer, CharTokenizer):
    return [c.encode("utf-8") for c in tokenizer.chars]
  if isinstance(tokenizer, SentencePieceTokenizer):
    return _sentencepiece_token_bytes(tokenizer)
  if type(tokenizer).__name__ == "HFTokenizer":  # by name: `tokenizers` is optional
    return _hf_token_bytes(tokenizer)
  raise TypeError(f"token_bytes does not know tokenizers of type {type(tokenizer).__name__}.")


# --- the automaton ----------------------------------------------------------------------


@struct.dataclass
class StopStringTable:
  """Per-token transitions of one byte automaton per stop string."""
  # int32 [num_strings, max_len + 1, vocab]: from state q (bytes of string s matched so
  # far) after token t. State lengths[s] means s has occurred; it is absorbing. Rows past
  # lengths[s] are never reached (they hold lengths[s]).
  transitions: jax.Array
  lengths: jax.Array  # int32 [num_strings]: byte length of each string


def _byte_automaton(pattern: bytes) -> np.ndarray:
  """int32 [len + 1, 256]: KMP's automaton over bytes, with the full match absorbing."""
  m = len(pattern)
  failure = [0] * m  # failure[i]: longest proper border of pattern[:i + 1]
  k = 0
  for i in range(1, m):
    while k and pattern[i] != pattern[k]:
      k = failure[k - 1]
    if pattern[i] == pattern[k]:
      k += 1
    failure[i] = k
  delta = np.zeros((m + 1, 256), np.int32)  # [state, byte]
  delta[0, pattern[0]] = 1
  for q in range(1, m):
    # A mismatch in state q continues as the longest border would; a match advances.
    delta[q] = delta[failure[q - 1]]
    delta[q, pattern[q]] = q + 1
  delta[m] = m
  return delta


def _padded_bytes(token_bytes: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 [vocab, max_token_len] zero-padded, int64 [vocab] lengths) of the tokens."""
  lengths = np.fromiter((len(b) for b in token_bytes), np.int64, len(token_bytes))
  width = max(int(lengths.max(initial=0)), 1)
  flat = np.frombuffer(b"".join(token_bytes), np.uint8)  # [total bytes]
  rows = np.repeat(np.arange(len(token_bytes)), lengths)  # [total bytes]
  starts = np.cumsum(lengths) - lengths
  cols = np.arange(flat.size) - np.repeat(starts, lengths)
  padded = np.zeros((len(token_bytes), width), np.uint8)
  padded[rows, cols] = flat
  return padded, lengths


def _token_transitions(pattern: bytes, padded: np.ndarray, lengths: np.ndarray,
                       present: np.ndarray) -> np.ndarray:
  """int32 [len(pattern) + 1, vocab]: every state through every token's bytes."""
  m = len(pattern)
  vocab = len(lengths)
  delta = _byte_automaton(pattern)  # [m + 1, 256]
  out = np.zeros((m + 1, vocab), np.int32)
  out[m] = m
  # A token with none of the pattern's bytes sends every unfinished state to 0; only the
  # others run the automaton, all states at once, longest tokens first so that byte
  # position j is a prefix of the rows. Empty tokens (control ones) run it for no bytes:
  # they leave every state as it is.
  relevant = np.flatnonzero(present[:, np.frombuffer(pattern, np.uint8)].any(axis=1)
                            | (lengths == 0))
  if relevant.size:
    relevant = relevant[np.argsort(-lengths[relevant], kind="stable")]
    token_len = lengths[relevant]  # [n], descending
    relevant_bytes = padded[relevant]  # [n, width]
    state = np.broadcast_to(np.arange(m + 1, dtype=np.int32), (relevant.size, m + 1)).copy()
    for j in range(int(token_len[0])):
      live = int(np.searchsorted(-token_len, -j, side="left"))  # rows with len > j
      state[:live] = delta[state[:live], relevant_bytes[:live, j, None]]
    out[:, relevant] = state.T
  return out


def build_table(token_bytes: Sequence[bytes], strings: Sequence[str]) -> StopStringTable:
  """The transitions of `strings` over a vocabulary, `token_bytes(tokenizer)`; built on the
  host with numpy once per generation call."""
  if isinstance(strings, str):
    strings = [strings]
  if not strings:
    raise ConfigError("build_table needs at least one stop string.")
  if any(not s for s in strings):
    raise ConfigError(f"A stop string must not be empty; got {list(strings)!r}.")
  patterns = [s.encode("utf-8") for s in strings]
  padded, lengths = _padded_bytes(token_bytes)  # [vocab, width], [vocab]
  # present[t, b]: token t has byte b somewhere.
  present = np.zeros((len(token_bytes), 256), bool)
  present[np.repeat(np.arange(len(token_bytes)), lengths),
          np.frombuffer(b"".join(token_bytes), np.uint8)] = True
  max_len = max(len(p) for p in patterns)
  transitions = np.zeros((len(patterns), max_len + 1, len(token_bytes)), np.int32)
  for s, pattern in enumerate(patterns):
    transitions[s, :len(pattern) + 1] = _token_transitions(pattern, padded, lengths, present)
    transitions[s, len(pattern) + 1:] = len(pattern)
  return StopStringTable(transitions=jnp.asarray(transitions),
                         lengths=jnp.asarray([len(p) for p in patterns], jnp.int32))


def initial_state(table: StopStringTable, batch: int) -> jax.Array:
  """int32 [batch, num_strings]: nothing matched yet."""
  return jnp.zeros((batch, table.lengths.shape[0]), jnp.int32)


def advance(table: StopStringTable, state, tokens) -> tuple[jax.Array, jax.Array]:
  """Feeds one token per row: state int32 [batch, num_strings], tokens int32 [batch] ->
  (new state, hit bool [batch]: some string has occurred in the bytes fed since the
  initial state). Tokens outside [0, vocab) (e.g. -1 padding) leave the state unchanged."""
  state = jnp.asarray(state, jnp.int32)
  tokens = jnp.asarray(tokens, jnp.int32)
  num_strings, _, vocab = table.transitions.shape
  valid = (tokens >= 0) & (tokens < vocab)  # [batch]
  safe = jnp.where(valid, tokens, 0)  # [batch]
  stepped = table.transitions[jnp.arange(num_strings)[None, :], state,
                              safe[:, None]]  # [batch, num_strings]
  new_state = jnp.where(valid[:, None], stepped, state)
  hit = jnp.any(new_state >= table.lengths[None, :], axis=-1)  # [batch]
  return new_state, hit


# --- host side --------------------------------------------------------------------------


def cut(token_bytes: Sequence[bytes], tokens: Sequence[int],
        strings: Sequence[str]) -> tuple[str, int] | None:
  """Where generated `tokens` stop: None if no string occurs in their bytes; else (the
  text before the occurrence that ends first, the one `advance` detects first, the
  longest among those ending at the same byte; decoded as UTF-8 with errors="replace",
  the number of tokens up to and including the one in which it ends).

  Ids outside the vocabulary (padding) contribute no bytes, as in `advance`.
  """
  if isinstance(strings, str):
    strings = [strings]
  vocab = len(token_bytes)
  pieces = [token_bytes[t] if 0 <= t < vocab else b"" for t in (int(t) for t in tokens)]
  text = b"".join(pieces)
  best = None  # (end, -length): ends first, then longest
  for s in strings:
    pattern = s.encode("utf-8")
    if not pattern:
      raise ConfigError(f"A stop string must not be empty; got {list(strings)!r}.")
    start = text.find(pattern)  # a string's first occurrence is also its first to end
    if start >= 0:
      key = (start + len(pattern), -len(pattern))
      best = key if best is None or key < best else best
  if best is None:
    return None
  end, neg_length = best
  ends = np.cumsum([len(p) for p in pieces])  # [tokens]: bytes after each token
  count = int(np.searchsorted(ends, end, side="left")) + 1  # first token reaching `end`
  return text[:end + neg_length].decode("utf-8", errors="replace"), count
