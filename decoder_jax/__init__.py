"""decoder_jax: a JAX/Flax research codebase for decoder language models."""

__version__ = "0.1.0"


def load_pretrained(source: str, *, mesh=None, dtype: str | None = None):
  """A pretrained model ("gguf:FILE", "hf:DIR" or a converted DIR) with .config, .params and
  .tokenizer; see decoder_jax.pretrained. Imported on first call so `import decoder_jax`
  stays light."""
  from decoder_jax import pretrained
  return pretrained.load_pretrained(source, mesh=mesh, dtype=dtype)
