"""Import and export of pretrained weights: Hugging Face safetensors (`hf`) and llama.cpp
GGUF files (`gguf`), plus `fetch` for the files the tests and examples download.

Submodules import their heavy dependencies (gguf, safetensors, tokenizers) themselves, so
importing this package stays cheap; `decoder_jax.load_pretrained` is the usual entry point.
"""
