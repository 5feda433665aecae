"""Token ids to text deltas for a stream, never sending what the final text will not hold.

A token can be half of a UTF-8 character (decoded as a trailing "\\ufffd" until the rest
arrives), and the end of the text so far can be the start of a stop string (cut from the
final text if the string completes). Both are held back until they are settled; the
final text, cut as `inference.generate_batch` cuts it, then supplies the rest, so the
deltas of a stream concatenate to the reply a non-streamed request gets.
"""

from __future__ import annotations


class TextStream:
  """The text of one choice as its tokens arrive."""

  def __init__(self, tokenizer, stop: tuple[str, ...] = (), end_ids=()):
    self._tokenizer = tokenizer
    self._stop = tuple(stop)
    self._ends = set(end_ids)
    self._ids: list[int] = []
    self._sent = ""
    self._ended = False  # an end token or a stop string came: nothing more to send

  def push(self, token_id: int) -> str:
    """The text that `token_id` settles (often "", e.g. half a character)."""
    if self._ended:
      return ""
    if token_id in self._ends:
      self._ended = True
      return ""
    self._ids.append(int(token_id))
    # The whole text each time (not token by token): a token's text can depend on the
    # tokens before it (byte-level pieces, leading spaces).
    text = self._tokenizer.decode(self._ids)
    cut = first_stop(text, self._stop)
    if cut is not None:
      text, self._ended = text[:cut], True
    else:
      text = text[:len(text) - held_back(text, self._stop)]
    text = text.rstrip("\ufffd")
    if not text.startswith(self._sent):  # the decode rewrote sent text: leave it to finish
      return ""
    new, self._sent = text[len(self._sent):], text
    return new

  def finish(self, final_text: str) -> str:
    """What remains of `final_text`, the choice's whole reply, after what was sent."""
    # Not a continuation only if a decode rewrote sent text: the length still matches.
    rest = final_text[len(self._sent):]
    self._sent, self._ended = final_text, True
    return rest


def first_stop(text: str, stop: tuple[str, ...]) -> int | None:
  """Where the earliest stop string in `text` starts, or None."""
  found = [i for i in (text.find(s) for s in stop) if i >= 0]
  return min(found) if found else None


def held_back(text: str, stop: tuple[str, ...]) -> int:
  """The length of the longest end of `text` that a stop string starts with."""
  longest = 0
  for s in stop:
    for n in range(min(len(s) - 1, len(text)), longest, -1):
      if text.endswith(s[:n]):
        longest = n
        break
  return longest
