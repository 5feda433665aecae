"""`config.init_from`: start training from pretrained weights instead of a random init.

The source is anything `decoder_jax.load_pretrained` reads ("gguf:FILE", "hf:DIR", a
directory written by `python -m decoder_jax.convert`) or another run's training workdir
(its latest checkpoint). The architecture (widths, heads, vocabulary, ...) and the
tokenizer come from the source; the training choices (model.config.TRAINING_FIELDS) come
from the experiment's `config.model` section instead.
"""

from __future__ import annotations

from decoder_jax import inference
from decoder_jax.model.config import with_training_choices


def load(source: str, model_section, mesh) -> inference.TrainedModel:
  """The pretrained model to start from: params in `model_section.param_dtype`, laid out
  (scan or not) and sharded on `mesh` as training wants them."""
  start = inference.load_source(source, mesh)
  return inference.laid_out_as(start, with_training_choices(start.config, model_section), mesh)
