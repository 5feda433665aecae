"""Text corpora as tfds datasets: local plain-text files, or tfds catalog datasets.

A local corpus is one .txt file (a single long text) or a folder of .txt files (one
document per file). `LocalTextCorpus` prepares it once as array_record files and reads it
back with `as_data_source`, which needs no TensorFlow. Splits:
  * single text: train = text[:int(n * (1 - val_fraction))], validation = the rest
    (nanoGPT's split for val_fraction = 0.1);
  * many documents, sorted by path: the last val_fraction of documents is validation.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import hashlib
import importlib.util
import io
import os
import re
from pathlib import Path

import tensorflow_datasets as tfds
from etils import epath

from decoder_jax import progress
from decoder_jax.errors import ConfigError, NotFound, UserError

TEXT_SUFFIX = ".txt"

# Catalog splits used as validation. tiny_shakespeare's catalog split is 90/5/5; its
# validation+test is exactly nanoGPT's last 10%.
_CATALOG_EVAL_SPLITS = {"tiny_shakespeare": "validation+test"}


# Corpora that ship inside the package (decoder_jax/data/corpora/NAME/), read when
# data.corpus names one and no local folder is given.
BUNDLED_DIR = Path(__file__).resolve().parent / "corpora"


def bundled_corpus(name: str) -> Path | None:
  """The bundled copy of corpus `name` (a folder of .txt files), or None."""
  folder = BUNDLED_DIR / name
  return folder if name and "/" not in name and folder.is_dir() else None


class CorpusUnavailableError(UserError, RuntimeError):
  """A catalog corpus could not be downloaded or prepared on this machine."""


@dataclasses.dataclass
class CorpusSplits:
  source: str  # Where the text came from, for messages: a path or "tfds:NAME".
  # Documents, or for a single text consecutive pieces of it (joined without separators).
  train: list[str]
  validation: list[str]
  single_text: bool  # One long text split by characters, rather than many documents.
  cache_dir: epath.Path  # The prepared tfds copy; derived files (a trained tokenizer) go here.


def list_documents(path: str | os.PathLike) -> list[Path]:
  """The corpus files: `path` itself, or the .txt files under it sorted by relative path."""
  path = Path(path)
  if path.is_file():
    return [path]
  if not path.exists():
    raise NotFound(f"Corpus path {path} does not exist.")
  files = sorted(
      (p for p in path.rglob(f"*{TEXT_SUFFIX}") if p.is_file()),
      key=lambda p: p.relative_to(path).as_posix(),
  )
  if not files:
    raise NotFound(f"Corpus folder {path} contains no {TEXT_SUFFIX} files.")
  return files


def read_utf8(path: Path) -> str:
  """Reads a file as UTF-8; a bad byte gives a ValueError naming the file and offset."""
  data = path.read_bytes()
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ConfigError(
        f"Corpus file {path} is not UTF-8 text: byte 0x{data[e.start]:02x} at byte offset "
        f"{e.start} ({e.reason})."
    ) from None


def _fingerprint(path: Path, files: list[Path], val_fraction: float) -> str:
  # Path + size + mtime, not content: hashing a multi-GB corpus at every start would be
  # slow, and any edit that matters changes the size or the mtime.
  digest = hashlib.sha256(repr((str(path.resolve()), val_fraction)).encode())
  for f in files:
    stat = f.stat()
    digest.update(repr((f.relative_to(path).as_posix() if f != path else f.name,
                        stat.st_size, stat.st_mtime_ns)).encode())
  return digest.hexdigest()[:16]


@dataclasses.dataclass
class LocalTextConfig(tfds.core.BuilderConfig):
  path: str = ""
  val_fraction: float = 0.1


class LocalTextCorpus(tfds.core.GeneratorBasedBuilder):
  """Plain-text files on disk; the config name carries a fingerprint of the files."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Single text split by characters, documents split by file."}

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # tfds looks for a checksums file next to a builder's module through
    # `importlib_resources`, which tfds 4.9.10 uses on every Python but declares only for
    # Python < 3.9. This builder downloads nothing, so there is nothing to look up.
    return None

  def _info(self) -> tfds.core.DatasetInfo:
    # DatasetInfo directly: `dataset_info_from_configs` expects metadata files next to
    # the builder's module.
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"Plain text from {self.builder_config.path}.",
        features=tfds.features.FeaturesDict(
            {"text": tfds.features.Text(), "name": tfds.features.Text()}
        ),
        disable_shuffling=True,  # Keep documents in file-name order.
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    path = Path(self.builder_config.path)
    train, validation = split_documents(path, self.builder_config.val_fraction)
    return {
        "train": self._generate_examples(train),
        "validation": self._generate_examples(validation),
    }

  def _generate_examples(self, documents: list[tuple[str, str]]):
    for index, (name, text) in enumerate(counted(documents)):
      yield index, {"text": text, "name": name}


def split_documents(path: Path, val_fraction: float):
  """Reads the corpus and returns (train, validation) lists of (name, text)."""
  files = list_documents(path)
  if len(files) == 1:
    text = read_utf8(files[0])
    cut = int(len(text) * (1 - val_fraction))  # nanoGPT: train = text[:int(n * 0.9)]
    return [(files[0].name, text[:cut])], [(files[0].name, text[cut:])]
  names = [f.relative_to(path).as_posix() for f in files]
  documents = list(zip(names, (read_utf8(f) for f in files)))
  cut = int(len(documents) * (1 - val_fraction))
  if cut == 0:
    raise ConfigError(
        f"Corpus folder {path} has {len(documents)} documents; with val_fraction="
        f"{val_fraction} none is left for training."
    )
  return documents[:cut], documents[cut:]


# The display of the preparation under way, which the builders' example generators count.
_PREPARING: contextvars.ContextVar[progress.Progress | None] = contextvars.ContextVar(
    "preparing", default=None)


def counted(examples):
  """Yields `examples`, counting each on the display of the preparation under way."""
  for example in examples:
    yield example
    shown = _PREPARING.get()
    if shown is not None:
      shown.update()


def prepare(builder: tfds.core.DatasetBuilder, what: str) -> None:
  """builder.download_and_prepare(), shown as one decoder_jax progress display.

  tfds' own bars (off from here on, for the process) and its two messages go away: the
  messages go to stdout, where they would mix with a command's output.
  """
  if builder.is_prepared():
    return
  tfds.display_progress_bar(False)
  with progress.Progress(f"preparing {what}", unit="examples") as shown:
    token = _PREPARING.set(shown)
    try:
      with contextlib.redirect_stdout(io.StringIO()):
        builder.download_and_prepare(file_format="array_record")
    finally:
      _PREPARING.reset(token)


def _slug(text: str) -> str:
  return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "corpus"


def _read_split(builder: tfds.core.DatasetBuilder, split: str) -> list[str]:
  # Whole splits are read into memory: these corpora feed an in-memory token stream.
  source = builder.as_data_source(split=split)
  return [example["text"].decode("utf-8") for example in source]


@contextlib.contextmanager
def _preparation_lock(builder: tfds.core.DatasetBuilder):
  """Held while a corpus is prepared: two runs that start on the same new corpus at once
  (a sweep, a bf16/float32 pair) would otherwise both write it, and the second to finish
  fails renaming its copy onto the first's. Local data dirs only (filelock needs a local
  file system); a remote one is prepared unguarded, as before."""
  config_dir = os.path.dirname(os.fspath(builder.data_dir))  # .../NAME/CONFIG (above VERSION)
  if "://" in config_dir:
    yield
    return
  import filelock  # a dependency already (JAX's compilation cache evicts with it)
  os.makedirs(config_dir, exist_ok=True)
  with filelock.FileLock(os.path.join(config_dir, ".prepare.lock")):
    yield


def load_local_corpus(
    path: str | os.PathLike, *, val_fraction: float, data_dir: str | None
) -> CorpusSplits:
  """Prepares (once) and reads a local file or folder of .txt files."""
  path = Path(path).expanduser()
  files = list_documents(path)
  if sum(f.stat().st_size for f in files) == 0:
    raise ConfigError(f"Corpus {path} is empty ({len(files)} file(s), 0 bytes).")
  if not 0.0 < val_fraction < 1.0:
    raise ConfigError(f"val_fraction must lie in (0, 1); got {val_fraction}.")
  name = _slug(path.stem if path.is_file() else path.name)
  config = LocalTextConfig(
      name=f"{name}_{_fingerprint(path, files, val_fraction)}",
      path=str(path.resolve()),
      val_fraction=val_fraction,
      description=f"Plain text from {path}.",
  )
  with _preparation_lock(LocalTextCorpus(config=config, data_dir=data_dir,
                                         file_format="array_record")):
    # Built under the lock: a builder made before another process finished preparing
    # would not see the splits that process wrote.
    builder = LocalTextCorpus(config=config, data_dir=data_dir, file_format="array_record")
    prepare(builder, f"corpus {path}")  # A no-op once prepared.
  return CorpusSplits(
      source=str(path),
      train=_read_split(builder, "train"),
      validation=_read_split(builder, "validation"),
      single_text=len(files) == 1,
      cache_dir=epath.Path(builder.data_dir),
  )


def _local_alternative() -> str:
  return (
      "Point the loader at a local copy instead: set data.local_dir (or the "
      "DECODER_JAX_DATA environment variable) to a folder holding CORPUS/input.txt, or "
      "set data.path to a .txt file or a folder of .txt files."
  )


def load_catalog_corpus(name: str, *, data_dir: str | None) -> CorpusSplits:
  """Reads a tfds catalog dataset with a "text" feature, downloading it if needed."""
  try:
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ConfigError(f"data.corpus={name!r} is not a tfds catalog dataset. "
                      + _local_alternative().replace("CORPUS", name)) from e
  if not builder.is_prepared():
    with _preparation_lock(builder):  # another run may be preparing it right now
      builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
      if not builder.is_prepared():
        _prepare_catalog(builder, name)
  if "text" not in builder.info.features:
    raise ConfigError(f"tfds dataset {name} has no 'text' feature; it has "
                      f"{list(builder.info.features)}.")
  splits = builder.info.splits
  eval_split = _CATALOG_EVAL_SPLITS.get(name) or next(
      (s for s in ("validation", "test") if s in splits), None)
  if "train" not in splits or eval_split is None:
    raise ConfigError(f"tfds dataset {name} needs a train and a validation or test split; "
                      f"it has {list(splits)}.")
  train = _read_split(builder, "train")
  return CorpusSplits(
      source=f"tfds:{name}",
      train=train,
      validation=_read_split(builder, eval_split),
      single_text=len(train) == 1,
      cache_dir=epath.Path(builder.data_dir),
  )


def tensorflow_installed() -> bool:
  return importlib.util.find_spec("tensorflow") is not None


def _prepare_catalog(builder: tfds.core.DatasetBuilder, name: str) -> None:
  # Catalog builders prepare through TensorFlow: tiny_shakespeare's reads its download
  # with tf.io.gfile (checked with tfds 4.9.10: ModuleNotFoundError 'tensorflow' after
  # the download). Reading an already prepared array_record copy does not need it, so
  # only preparing is refused, before a download that would be wasted.
  if not tensorflow_installed():
    raise CorpusUnavailableError(
        f"tfds catalog dataset {name!r} is not prepared in {builder.data_dir}, and "
        "preparing it needs TensorFlow (tfds catalog builders read their downloads "
        "through tf.io.gfile), which is not installed. "
        + _local_alternative().replace("CORPUS", name)
        + " Or prepare it as array_record on a machine with TensorFlow and set "
        "data.tfds_data_dir to that copy."
    )
  try:
    # Offline, tfds retries each download about ten times with backoff (~3 min).
    prepare(builder, f"tfds catalog dataset {name}")
  except ModuleNotFoundError as e:
    raise CorpusUnavailableError(
        f"Preparing tfds catalog dataset {name!r} needs the Python module {e.name!r}, "
        "which is not installed. " + _local_alternative().replace("CORPUS", name)
    ) from e
  except Exception as e:  # pylint: disable=broad-except
    raise CorpusUnavailableError(
        f"Downloading or preparing tfds catalog dataset {name!r} failed ({type(e).__name__}:"
        f" {e}). Without internet access: " + _local_alternative().replace("CORPUS", name)
    ) from e
