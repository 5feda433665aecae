"""The metrics each field reports, computed by the libraries the field uses (sacrebleu)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
  """Corpus BLEU (0-100) with sacrebleu's defaults (13a tokenizer, exp smoothing, cased),
  one reference per hypothesis: the number papers quote as "sacreBLEU"."""
  import sacrebleu

  if len(hypotheses) != len(references):
    raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
  if not hypotheses:
    raise ValueError("BLEU of an empty corpus is undefined")
  return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
  predictions, labels = _as_pair(predictions, labels)
  return float((predictions == labels).mean())


def macro_f1(predictions: Sequence[int], labels: Sequence[int], num_labels: int) -> float:
  """Mean over the `num_labels` classes of F1 (a class never predicted nor present scores 0,
  as in scikit-learn's zero_division=0)."""
  predictions, labels = _as_pair(predictions, labels)
  scores = []
  for c in range(num_labels):
    tp = np.sum((predictions == c) & (labels == c))
    fp = np.sum((predictions == c) & (labels != c))
    fn = np.sum((predictions != c) & (labels == c))
    scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
  return float(np.mean(scores))


def perplexity(mean_token_loss: float) -> float:
  """exp of the mean per-token cross-entropy (nats)."""
  return float(math.exp(min(mean_token_loss, 700.0)))  # exp(700) is near float64's limit


def _as_pair(predictions, labels) -> tuple[np.ndarray, np.ndarray]:
  predictions, labels = np.asarray(predictions), np.asarray(labels)
  if predictions.shape != labels.shape or predictions.ndim != 1:
    raise ValueError(f"predictions {predictions.shape} and labels {labels.shape} must be "
                     "equal-length 1-D sequences")
  if not len(labels):
    raise ValueError("no examples to score")
  return predictions, labels
