"""Task metrics (BLEU, accuracy, macro-F1, perplexity) and the evaluators that produce them."""

from decoder_jax.evaluation.metrics import accuracy, bleu, macro_f1, perplexity
