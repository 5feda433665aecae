r"""Trains a SentencePiece model on a text file or a folder of .txt files.

  python -m decoder_jax.data.train_sentencepiece \
      --input=decoder_jax/data/corpora/tiny_shakespeare/input.txt \
      --model_prefix=/tmp/spm/shakespeare --vocab_size=1000

writes PREFIX.model and PREFIX.vocab; point data.spm_model at PREFIX.model.
"""

from absl import flags, logging

from decoder_jax import cli
from decoder_jax.data import text_corpus
from decoder_jax.data.tokenizers import SentencePieceTokenizer

_INPUT = flags.DEFINE_string("input", None, "A text file, or a folder of .txt files.",
                             required=True)
_MODEL_PREFIX = flags.DEFINE_string("model_prefix", None, "Writes PREFIX.model, PREFIX.vocab.",
                                    required=True)
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 1000, "Number of pieces.")
_MODEL_TYPE = flags.DEFINE_enum("model_type", "unigram", ["unigram", "bpe", "char", "word"],
                                "SentencePiece model type.")


def main(argv):
  del argv
  files = text_corpus.list_documents(_INPUT.value)
  for path in files:
    text_corpus.read_utf8(path)  # Fail on non-UTF-8 input with the file and byte offset.
  tokenizer = SentencePieceTokenizer.train(
      files, _MODEL_PREFIX.value, _VOCAB_SIZE.value, model_type=_MODEL_TYPE.value)
  logging.info("Wrote %s.model (%d pieces) from %d file(s).", _MODEL_PREFIX.value,
               tokenizer.vocab_size, len(files))


if __name__ == "__main__":
  cli.run(main)
