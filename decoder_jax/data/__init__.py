"""Input data: tokenizers, tfds text corpora and grain batch pipelines."""

from decoder_jax.data.pipeline import Datasets, default_data_config, make_datasets
from decoder_jax.data.tokenizers import (
    CharTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
    save_tokenizer,
)
