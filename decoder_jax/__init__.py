"""decoder_jax: a JAX/Flax research codebase for decoder language models."""

__version__ = "0.1.0"
