"""Stop strings on token ids: the byte automaton against a plain search of the bytes."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoder_jax.data.tokenizers import CharTokenizer, SentencePieceTokenizer
from decoder_jax.decoding import stop_strings
from decoder_jax.errors import ConfigError

# A made-up vocabulary: multi-byte tokens, one holding a whole stop string in its middle,
# the three UTF-8 bytes of "€" split across tokens, and an empty (control-like) token.
VOCAB = [b"a", b"b", b"ab", b"aab", b"xaabx", b"abab", b"ba", b"bab", b"c", b"zz",
         b"\xe2", b"\x82\xac", b"\xe2\x82", b"\xac", b"\xe2\x82\xac", b"", b"\n", b"b\n"]
STRINGS = ["aab", "abab", "\u20ac", "b\nb", "c"]  # self-overlapping, multi-byte, different lengths


def _first_end(data: bytes, patterns: list[bytes]) -> tuple[int, bytes] | None:
  """(end, pattern) of the occurrence ending first (longest at that end), by scanning."""
  for end in range(1, len(data) + 1):
    ending = [p for p in patterns if data[:end].endswith(p)]
    if ending:
      return end, max(ending, key=len)
  return None


def _expected_cut(vocab, tokens, strings):
  pieces = [vocab[t] if t >= 0 else b"" for t in tokens]
  data = b"".join(pieces)
  found = _first_end(data, [s.encode() for s in strings])
  if found is None:
    return None
  end, pattern = found
  count = next(i + 1 for i in range(len(pieces)) if len(b"".join(pieces[:i + 1])) >= end)
  return data[:end - len(pattern)].decode("utf-8", errors="replace"), count


def _matched(data: bytes, pattern: bytes) -> int:
  """The automaton's state by definition: the longest prefix of `pattern` ending `data`,
  or len(pattern) once the pattern has occurred."""
  if pattern in data:
    return len(pattern)
  return max(k for k in range(len(pattern)) if data.endswith(pattern[:k]))


def _run(table, tokens):
  """tokens [batch, time] -> (states [time, batch, strings], hits [time, batch]), jitted."""
  @jax.jit
  def scan(table, tokens):
    def step(state, column):
      state, hit = stop_strings.advance(table, state, column)
      return state, (state, hit)
    _, (states, hits) = jax.lax.scan(step, stop_strings.initial_state(table, tokens.shape[0]),
                                     tokens.T)
    return states, hits
  states, hits = scan(table, jnp.asarray(tokens, jnp.int32))
  return np.asarray(states), np.asarray(hits)


@pytest.mark.parametrize("strings", [STRINGS, ["abab"], ["aab", "\u20ac"]])
def test_automaton_matches_brute_force_search(strings):
  rng = np.random.default_rng(len(strings))
  batch, steps = 48, 14
  tokens = rng.integers(0, len(VOCAB), (batch, steps))
  # Bias towards the letters so that partial matches and long near-misses are common.
  tokens = np.where(rng.random((batch, steps)) < 0.5, rng.integers(0, 8, (batch, steps)), tokens)
  # Rows end early, padded with -1: padding must change nothing.
  tokens = np.where(np.arange(steps) < rng.integers(1, steps + 1, (batch, 1)), tokens, -1)
  table = stop_strings.build_table(VOCAB, strings)
  patterns = [s.encode() for s in strings]
  assert table.transitions.dtype == jnp.int32
  assert table.transitions.shape == (len(strings), max(map(len, patterns)) + 1, len(VOCAB))
  np.testing.assert_array_equal(table.lengths, [len(p) for p in patterns])
  states, hits = _run(table, tokens)
  some_hit = some_miss = False
  for row in range(batch):
    expected = _expected_cut(VOCAB, tokens[row].tolist(), strings)
    assert stop_strings.cut(VOCAB, tokens[row].tolist(), strings) == expected
    first_hit = int(np.argmax(hits[:, row])) if hits[:, row].any() else None
    assert first_hit == (None if expected is None else expected[1] - 1)
    some_hit |= expected is not None
    some_miss |= expected is None
    for t in range(steps):
      data = b"".join(VOCAB[i] for i in tokens[row, :t + 1] if i >= 0)
      assert hits[t, row] == any(p in data for p in patterns)
      assert states[t, row].tolist() == [_matched(data, p) for p in patterns]
  assert some_hit and some_miss


def test_string_inside_one_token_is_absorbing_from_every_state():
  table = stop_strings.build_table(VOCAB, ["aab", "abab"])
  transitions = np.asarray(table.transitions)  # [2, 5, vocab]
  assert (transitions[0, :4, VOCAB.index(b"xaabx")] == 3).all()
  assert (transitions[1, :5, VOCAB.index(b"abab")] == 4).all()
  # A token with no byte of the string resets it; one finishing a prefix completes it.
  assert transitions[0, :3, VOCAB.index(b"zz")].tolist() == [0, 0, 0]
  assert transitions[1, :4, VOCAB.index(b"b")].tolist() == [0, 2, 0, 4]
  assert transitions[1, 3, VOCAB.index(b"ba")] == 4  # "aba" + "b" completes "abab"


def test_cut_takes_the_occurrence_that_ends_first_then_the_longest():
  vocab = [b"xab", b"cd", b"e", b"bc"]
  # "bcd" starts before "cd" ends, but "cd" and "bcd" end together: the longer one wins.
  assert stop_strings.cut(vocab, [0, 1, 2], ["cd", "bcd", "abcde"]) == ("xa", 2)
  # "abcde" starts first but ends after "cd"; it does win against "de", ending with it.
  assert stop_strings.cut(vocab, [0, 1, 2], ["abcde", "cd"]) == ("xab", 2)
  assert stop_strings.cut(vocab, [0, 1, 2], ["de", "abcde"]) == ("x", 3)
  assert stop_strings.cut(vocab, [0, 1, 2], ["zz"]) is None
  # An occurrence ends in the token that holds its last byte, not in an empty one after.
  assert stop_strings.cut([b"ab", b"", b"c"], [0, 1, 2], ["b"]) == ("a", 1)
  assert stop_strings.cut([b"ab", b"", b"c"], [0, 1, 2], ["bc"]) == ("a", 3)
  # Text cut inside a character is replaced, not an error.
  assert stop_strings.cut([b"\xe2\x82", b"!"], [0, 1], ["!"]) == ("\ufffd", 2)


def test_empty_strings_are_refused():
  with pytest.raises(ConfigError, match="empty"):
    stop_strings.build_table(VOCAB, ["ab", ""])
  with pytest.raises(ConfigError, match="at least one"):
    stop_strings.build_table(VOCAB, [])


def test_out_of_vocabulary_tokens_leave_the_state_unchanged():
  table = stop_strings.build_table(VOCAB, ["aab", "abab"])
  advance = jax.jit(stop_strings.advance)
  state, hit = advance(table, stop_strings.initial_state(table, 3),
                       jnp.array([0, 2, 4], jnp.int32))  # "a", "ab", "xaabx"
  assert state.tolist() == [[1, 1], [0, 2], [3, 0]] and hit.tolist() == [False, False, True]
  for pad in (-1, len(VOCAB), 10**6):
    same, same_hit = advance(table, state, jnp.full((3,), pad, jnp.int32))
    np.testing.assert_array_equal(same, state)
    assert same_hit.tolist() == [False, False, True]
  mixed, _ = advance(table, state, jnp.array([-1, 0, -1], jnp.int32))
  assert mixed.tolist() == [[1, 1], [1, 3], [3, 0]]  # "ab" + "a": "a" of "aab", "aba" of "abab"


def test_vmap_and_single_rows_agree_with_the_batch():
  table = stop_strings.build_table(VOCAB, STRINGS)
  rng = np.random.default_rng(0)
  groups, batch = 3, 5
  states = jnp.asarray(rng.integers(0, 2, (groups, batch, len(STRINGS))), jnp.int32)
  tokens = jnp.asarray(rng.integers(-1, len(VOCAB), (groups, batch)), jnp.int32)
  mapped = jax.jit(jax.vmap(stop_strings.advance, in_axes=(None, 0, 0)))(table, states, tokens)
  advance = jax.jit(stop_strings.advance)
  for g in range(groups):
    whole = advance(table, states[g], tokens[g])
    for out_mapped, out_whole in zip(mapped, whole):
      np.testing.assert_array_equal(out_mapped[g], out_whole)
    for b in range(batch):
      row = advance(table, states[g, b:b + 1], tokens[g, b:b + 1])
      for out_row, out_whole in zip(row, whole):
        np.testing.assert_array_equal(out_row[0], out_whole[b])


def test_while_loop_stops_at_the_stop_string():
  """The intended use: a jitted while_loop over a token stream, stopping rows on a hit."""
  vocab = [b"x", b"Us", b"er", b":", b"\n", b"r:"]
  stream = jnp.asarray([[0, 1, 2, 3, 0, 0], [1, 0, 4, 4, 0, 0], [1, 5, 0, 0, 0, 0],
                        [0, 0, 0, 0, 0, 0]], jnp.int32)  # [batch, time]
  table = stop_strings.build_table(vocab, ["User:", "\n\n"])

  @jax.jit
  def stop_steps(table, stream):
    def cond(carry):
      t, _, done, _ = carry
      return (t < stream.shape[1]) & ~done.all()

    def body(carry):
      t, state, done, steps = carry
      state, hit = stop_strings.advance(table, state, jnp.where(done, -1, stream[:, t]))
      steps = jnp.where(done, steps, t + 1)
      return t + 1, state, done | hit, steps

    batch = stream.shape[0]
    init = (0, stop_strings.initial_state(table, batch), jnp.zeros(batch, bool),
            jnp.zeros(batch, jnp.int32))
    _, _, done, steps = jax.lax.while_loop(cond, body, init)
    return done, steps

  done, steps = stop_steps(table, stream)
  assert done.tolist() == [True, True, False, False]
  assert steps.tolist() == [4, 4, 6, 6]  # "Us"+"er"+":" ends at token 4; "\n"+"\n" too
  assert stop_strings.cut(vocab, stream[0].tolist(), ["User:", "\n\n"]) == ("x", 4)
  assert stop_strings.cut(vocab, stream[1].tolist(), ["User:", "\n\n"]) == ("Usx", 4)


# --- real tokenizers --------------------------------------------------------------------


SENTENCE = ("Hello there! How are you?\n\nUser: fine, thanks. Na\u00efve \u20ac5 \u65e5\u672c"
            "  two  spaces")


def _join(table_bytes, ids) -> bytes:
  return b"".join(table_bytes[i] for i in ids)


def _check_stops(table_bytes, ids, strings):
  """advance (jitted) and cut agree with a search of the joined bytes."""
  table = stop_strings.build_table(table_bytes, strings)
  _, hits = _run(table, np.asarray([ids]))
  expected = _expected_cut(table_bytes, ids, strings)
  assert expected is not None
  assert stop_strings.cut(table_bytes, ids, strings) == expected
  assert int(np.argmax(hits[:, 0])) == expected[1] - 1 and hits[:, 0].any()
  return expected


def test_smollm2_tokenizer(smol_tokenizer):
  table_bytes = stop_strings.token_bytes(smol_tokenizer)
  assert len(table_bytes) == smol_tokenizer.vocab_size == 49152
  ids = smol_tokenizer.encode(SENTENCE, add_special_tokens=False)
  assert _join(table_bytes, ids) == SENTENCE.encode()
  chat = "<|im_start|>user\nhi<|im_end|>\n"
  chat_ids = smol_tokenizer.encode(chat, add_special_tokens=False)
  assert _join(table_bytes, chat_ids) == chat.encode()
  assert table_bytes[smol_tokenizer.token_to_id("<|im_end|>")] == b"<|im_end|>"
  # Token by token, agrees with the tokenizer's own decoder wherever a token is whole text.
  for i in np.random.default_rng(0).choice(len(table_bytes), 3000, replace=False).tolist():
    try:
      text = table_bytes[i].decode("utf-8")
    except UnicodeDecodeError:
      continue
    assert smol_tokenizer.decode([i]) == text, i

  start = time.perf_counter()
  stop_strings.build_table(table_bytes, ["\n\n", "User:"])
  print(f"build_table, 2 strings, {len(table_bytes)} tokens: {time.perf_counter() - start:.3f}s")

  cut_text, count = _check_stops(table_bytes, ids, ["User:", "\n\n"])
  assert cut_text == "Hello there! How are you?"
  assert _join(table_bytes, ids[:count]).endswith(b"\n\n")
  boundaries = set(np.cumsum([len(table_bytes[i]) for i in ids]).tolist())  # byte offsets
  # Several tokens each: "User:" ("User" ":"), "\n\n" ("\n" "\n"); and strings that start
  # and end inside tokens ("Hel|lo th|ere"), or inside a character's bytes.
  cases = [("User:", "Hello there! How are you?\n\n"), ("\n\n", "Hello there! How are you?"),
           ("lo th", "Hel"), ("\u20ac5 \u65e5", SENTENCE[:SENTENCE.index("\u20ac")]),
           ("User::", None)]
  for string, before in cases:
    if before is None:
      assert stop_strings.cut(table_bytes, ids, [string]) is None
      continue
    assert _check_stops(table_bytes, ids, [string])[0] == before
    start = len(before.encode())
    end = start + len(string.encode())
    assert len([b for b in boundaries if start < b < end]) >= 1  # spans a token boundary
    if string == "lo th":
      assert start not in boundaries and end not in boundaries
  # A special token's text inside it.
  assert _check_stops(table_bytes, chat_ids, ["im_end"])[0] == "<|im_start|>user\nhi<|"


def test_char_tokenizer():
  tokenizer = CharTokenizer.from_text(SENTENCE)
  table_bytes = stop_strings.token_bytes(tokenizer)
  assert len(table_bytes) == tokenizer.vocab_size
  ids = tokenizer.encode(SENTENCE)
  assert _join(table_bytes, ids) == SENTENCE.encode()
  assert _check_stops(table_bytes, ids, ["User:", "\n\n"])[0] == "Hello there! How are you?"
  euro = SENTENCE.index("\u20ac")
  assert _check_stops(table_bytes, ids, ["\u20ac5", "zzz"])[0] == SENTENCE[:euro]


@pytest.fixture(scope="module")
def spm_text(data_dir):
  return (data_dir / "tiny_shakespeare" / "input.txt").read_text(encoding="utf-8")[:30_000]


def test_sentencepiece_tokenizer(tmp_path, spm_text):
  # Byte fallback: characters unseen in training ("\u20ac", "\u65e5") become byte pieces.
  tokenizer = SentencePieceTokenizer.train_from_text(spm_text, tmp_path / "spm", 400,
                                                     byte_fallback=True)
  table_bytes = stop_strings.token_bytes(tokenizer)
  assert len(table_bytes) == tokenizer.vocab_size
  assert table_bytes[tokenizer.eos_id] == b"" and table_bytes[tokenizer.bos_id] == b""
  assert table_bytes[tokenizer.processor.piece_to_id("<0x0A>")] == b"\n"
  ids = tokenizer.encode(SENTENCE)
  assert any(tokenizer.processor.is_byte(i) for i in ids)
  assert _join(table_bytes, ids) == SENTENCE.encode() == tokenizer.decode(ids).encode()
  assert _check_stops(table_bytes, ids, ["User:", "\n\n"])[0] == "Hello there! How are you?"
  assert _check_stops(table_bytes, ids, ["\u65e5\u672c"])[0] == SENTENCE[:SENTENCE.index("\u65e5")]
  assert _check_stops(table_bytes, ids, ["e! H"])[0] == "Hello ther"

  # SentencePiece's own default adds a "\u2581" before the text: one leading space here.
  prefixed = SentencePieceTokenizer.train_from_text(spm_text, tmp_path / "spm_prefix", 200,
                                                    add_dummy_prefix=True)
  text = "First Citizen:\nBefore we proceed any further, hear me speak."
  assert _join(stop_strings.token_bytes(prefixed), prefixed.encode(text)) == b" " + text.encode()


def test_small_hf_tokenizers():
  """Byte-level BPE without the SmolLM2 data, and the decode fallback of other decoders."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  from decoder_jax.interop.hf_tokenizer import HFTokenizer

  backend = Tokenizer(models.BPE())
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|im_end|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  backend.train_from_iterator([SENTENCE] * 4 + ["User: hello there\n\n"] * 4, trainer)
  tokenizer = HFTokenizer(backend.to_str())
  table_bytes = stop_strings.token_bytes(tokenizer)
  assert len(table_bytes) == tokenizer.vocab_size
  assert table_bytes[tokenizer.token_to_id("<|im_end|>")] == b"<|im_end|>"
  assert table_bytes[tokenizer.token_to_id("\u010a")] == b"\n"  # GPT-2 spells "\n" as "Ċ"
  text = SENTENCE + "<|im_end|>"
  ids = tokenizer.encode(text)
  assert _join(table_bytes, ids) == text.encode()
  assert _check_stops(table_bytes, ids, ["are you?\n\nUs"])[0] == "Hello there! How "

  words = Tokenizer(models.WordLevel({"hello": 0, "world": 1, "[UNK]": 2}, unk_token="[UNK]"))
  words.pre_tokenizer = pre_tokenizers.Whitespace()
  assert stop_strings.token_bytes(HFTokenizer(words.to_str())) == [b"hello", b"world", b"[UNK]"]
