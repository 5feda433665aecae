"""decoder_jax.progress: a bar with count and ETA on a terminal, one summary line
elsewhere; and the long work that reports through it."""

import fcntl
import os
import pty
import select
import struct
import sys
import termios

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from decoder_jax import inference, progress
from decoder_jax.data import text_corpus
from decoder_jax.data.tokenizers import CharTokenizer
from decoder_jax.model import Decoder, ModelConfig


@pytest.fixture
def line_mode(monkeypatch):
  monkeypatch.setenv(progress.MODE_ENV, "line")


def test_summary_line_when_not_a_terminal(capsys, line_mode):
  assert list(progress.track(range(3), "counting", unit="things")) == [0, 1, 2]
  err = capsys.readouterr().err
  assert err.startswith("counting: 3 things in ") and err.endswith(" s\n")
  assert err.count("\n") == 1


def test_one_call_counts_its_work_at_the_end(capsys, line_mode):
  with progress.all_at_once("restoring a checkpoint", 7, "arrays"):
    assert capsys.readouterr().err == ""  # nothing while it runs
  assert capsys.readouterr().err.startswith("restoring a checkpoint: 7 arrays in ")


def test_no_summary_when_the_work_fails(capsys, line_mode):
  with pytest.raises(RuntimeError):
    with progress.Progress("failing", 5) as shown:
      shown.update(2)
      raise RuntimeError("boom")
  assert capsys.readouterr().err == ""


def test_a_terminal_gets_a_bar_with_count_and_eta(monkeypatch):
  """stderr on a pseudo-terminal: the mode is picked from isatty, not from the variable."""
  monkeypatch.delenv(progress.MODE_ENV, raising=False)
  leader, follower = pty.openpty()
  fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 columns
  terminal = os.fdopen(follower, "w")
  monkeypatch.setattr(sys, "stderr", terminal)
  try:
    for _ in progress.track(range(4), "working", unit="items"):
      pass
    terminal.flush()
    chunks = []
    while select.select([leader], [], [], 0.5)[0]:  # all the terminal has received
      chunks.append(os.read(leader, 65536))
    shown = b"".join(chunks).decode()
  finally:
    terminal.close()
    os.close(leader)
  assert "working" in shown and "4/4" in shown and "<" in shown  # 4/4 [00:00<00:00, ...]
  assert ": 4 items in" not in shown  # no summary line on a terminal


def test_corpus_preparation_is_one_line_and_keeps_stdout_clean(capfd, line_mode, tmp_path):
  for i in range(3):
    (tmp_path / "docs" / f"d{i}.txt").parent.mkdir(exist_ok=True)
    (tmp_path / "docs" / f"d{i}.txt").write_text(f"document {i} " * 20)
  text_corpus.load_local_corpus(tmp_path / "docs", val_fraction=0.34,
                                data_dir=str(tmp_path / "tfds"))
  out, err = capfd.readouterr()
  assert out == ""  # tfds' own messages went nowhere near a command's output
  lines = [line for line in err.splitlines() if line.startswith("preparing corpus")]
  assert len(lines) == 1 and ": 3 examples in" in lines[0], err
  text_corpus.load_local_corpus(tmp_path / "docs", val_fraction=0.34,
                                data_dir=str(tmp_path / "tfds"))
  assert "preparing" not in capfd.readouterr().err  # prepared once


def test_batches_of_prompts_report_progress_and_decode_as_one_batch(capsys, line_mode):
  alphabet = "abcdefghij "
  config = ModelConfig(family="gpt2", vocab_size=len(alphabet), num_layers=1, num_heads=2,
                       width=16, max_length=32)
  params = nn.unbox(Decoder(config).init(jax.random.key(0),
                                         jnp.zeros((1, 8), jnp.int32))["params"])
  trained = inference.TrainedModel(config, params, CharTokenizer.from_text(alphabet))
  prompts = ["abc", "j", "high", "bad cab", "e"]
  whole = inference.generate_batch(trained, prompts, max_new_tokens=6)
  capsys.readouterr()
  chunked = inference.generate_batch(trained, prompts, max_new_tokens=6, batch_size=2)
  assert chunked == whole  # greedy: each row decodes as it would alone
  err = capsys.readouterr().err
  assert err.startswith("decoding: 5 prompts in "), err
  beams = inference.generate_batch(trained, prompts, max_new_tokens=6, num_beams=2,
                                   batch_size=2)
  assert [b["samples"][0]["tokens"] for b in beams] == [
      b["samples"][0]["tokens"] for b in inference.generate_batch(
          trained, prompts, max_new_tokens=6, num_beams=2)]
  assert "beam search (2 beams): 5 prompts in" in capsys.readouterr().err
