"""Raw fine-tuning examples: local parallel text or labelled TSV files, or tfds catalog data.

Local layouts (prepared once as array_record by a tfds builder, read back with
`as_data_source`, no TensorFlow):
  * parallel text (Multi30k): DIR/{split}.{lang}.gz or DIR/{split}.{lang}, one sentence
    per line, line i of every language is the same sentence. Splits are the file
    prefixes present for both languages.
  * labelled TSV (GLUE SST-2): DIR/{split}.tsv with a header line naming the columns.

Catalog datasets (`wmt14_translate/fr-en`, `glue/sst2`, ...) are read through the same
`as_data_source` once prepared; preparing them needs TensorFlow and internet access, so
without those a `TaskDataUnavailableError` says to pass a local directory instead.

`load_parallel` / `load_labelled` / `load_jsonl` return python lists of dicts, in file
order; `max_examples` keeps the first n (deterministic, for small CPU recipes).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib
import io
import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import tensorflow_datasets as tfds

from decoder_jax.data import text_corpus
from decoder_jax.errors import ConfigError, NotFound

TSV_SUFFIX = ".tsv"
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
# Catalog builders that tfds only registers once their module is imported (the legacy
# text/translate packages are not imported by `import tensorflow_datasets`).
_CATALOG_MODULES = {
    "glue": "tensorflow_datasets.text.glue",
    **{f"wmt{year}_translate": f"tensorflow_datasets.translate.wmt{year}"
       for year in range(13, 20)},
}
# Text field of catalog classification datasets whose text is not under "text".
_CATALOG_TEXT_FIELDS = {"glue/sst2": "sentence", "glue/cola": "sentence"}


class TaskDataUnavailableError(text_corpus.CorpusUnavailableError):
  """A catalog dataset could not be found, downloaded or prepared on this machine."""


# ----------------------------------------------------------------------------- local files


def _open_text(path: Path) -> io.TextIOBase:
  # newline="" keeps "\r" so that _strip_eol, not the reader, decides what a line end is.
  if path.name.endswith(".gz"):
    return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
  return open(path, encoding="utf-8", newline="")


def _strip_eol(line: str) -> str:
  # "\n" or "\r\n" (SST-2's train.tsv has Windows line ends, its dev.tsv does not).
  if line.endswith("\n"):
    line = line[:-1]
  if line.endswith("\r"):
    line = line[:-1]
  return line


def _read_lines(path: Path) -> Iterator[str]:
  """Lines of a UTF-8 (optionally gzipped) file; a bad byte names the file and line."""
  number = 0
  try:
    with _open_text(path) as f:
      for number, line in enumerate(f, start=1):
        yield _strip_eol(line)
  except UnicodeDecodeError as e:
    raise ConfigError(f"{path} is not UTF-8 text near line {number + 1}: {e.reason}.") from None


def _count_lines(path: Path) -> int:
  return sum(1 for _ in _read_lines(path))


def _fingerprint(directory: Path, files: Sequence[Path], *settings) -> str:
  # Path + size + mtime, as text_corpus: a changed file changes the config name, so it
  # is prepared again; the settings (languages, columns, labels) are part of it too.
  digest = hashlib.sha256(repr((str(directory.resolve()), settings)).encode())
  for f in sorted(files):
    stat = f.stat()
    digest.update(repr((f.name, stat.st_size, stat.st_mtime_ns)).encode())
  return digest.hexdigest()[:16]


def _slug(text: str) -> str:
  return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "data"


def _check_directory(directory: Path) -> None:
  if not directory.is_dir():
    raise NotFound(f"Task data directory {directory} does not exist or is not a "
                   "directory.")


def parallel_files(directory: str | os.PathLike, src_lang: str,
                   tgt_lang: str) -> dict[str, tuple[Path, Path]]:
  """{split: (source file, target file)} for every split that has both languages."""
  directory = Path(directory).expanduser()
  _check_directory(directory)
  if src_lang == tgt_lang:
    raise ConfigError(f"Source and target language are both {src_lang!r}.")
  found: dict[tuple[str, str], Path] = {}
  for path in sorted(directory.iterdir()):
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    split, _, lang = name.rpartition(".")
    if path.is_file() and split and lang in (src_lang, tgt_lang):
      if (split, lang) in found:
        raise ConfigError(f"{directory} holds both {found[split, lang].name} and {path.name} "
                          f"for split {split!r}, language {lang!r}; keep one.")
      found[split, lang] = path
  splits = sorted({split for split, _ in found})
  pairs = {s: (found[s, src_lang], found[s, tgt_lang]) for s in splits
           if (s, src_lang) in found and (s, tgt_lang) in found}
  if not pairs:
    names = sorted(p.name for p in directory.iterdir())
    raise NotFound(
        f"{directory} has no split with both {{split}}.{src_lang}[.gz] and "
        f"{{split}}.{tgt_lang}[.gz] files; it holds {names[:20]}.")
  return pairs


@dataclasses.dataclass
class ParallelTextConfig(tfds.core.BuilderConfig):
  directory: str = ""
  src_lang: str = "en"
  tgt_lang: str = "fr"


class ParallelTextFiles(tfds.core.GeneratorBasedBuilder):
  """Line-aligned sentence files, one per split and language; `source` / `target` text."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Line-aligned {split}.{lang}[.gz] files."}

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    return None  # Nothing is downloaded, so no checksums file to find (see text_corpus).

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"{config.src_lang}-{config.tgt_lang} sentences from {config.directory}.",
        features=tfds.features.FeaturesDict(
            {"source": tfds.features.Text(), "target": tfds.features.Text()}),
        disable_shuffling=True,  # Keep file order: max_examples takes the first lines.
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    config = self.builder_config
    pairs = parallel_files(config.directory, config.src_lang, config.tgt_lang)
    for source, target in pairs.values():  # Before writing anything.
      counts = _count_lines(source), _count_lines(target)
      if counts[0] != counts[1]:
        raise ConfigError(
            f"Parallel files are not line-aligned: {source} has {counts[0]} lines but "
            f"{target} has {counts[1]}.")
    return {split: self._generate_examples(*pair) for split, pair in pairs.items()}

  def _generate_examples(self, source: Path, target: Path):
    pairs = text_corpus.counted(zip(_read_lines(source), _read_lines(target)))
    for index, (src, tgt) in enumerate(pairs):
      yield index, {"source": src, "target": tgt}


def tsv_files(directory: str | os.PathLike) -> dict[str, Path]:
  """{split: DIR/split.tsv}."""
  directory = Path(directory).expanduser()
  _check_directory(directory)
  files = {p.name[: -len(TSV_SUFFIX)]: p for p in sorted(directory.glob(f"*{TSV_SUFFIX}"))
           if p.is_file()}
  if not files:
    raise NotFound(f"{directory} holds no {{split}}{TSV_SUFFIX} files.")
  return files


def _as_names(value: str | Sequence[str]) -> tuple[str, ...]:
  return (value,) if isinstance(value, str) else tuple(value)


def _column(header: list[str], candidates: tuple[str, ...], role: str, path: Path) -> int:
  for name in candidates:
    if name in header:
      return header.index(name)
  wanted = " or ".join(repr(c) for c in candidates)
  raise ConfigError(f"{path}: no {role} column {wanted}; the header line has columns {header}.")


def read_parallel_pair(source_file: str | os.PathLike, reference_file: str | os.PathLike
                       ) -> list[dict[str, str]]:
  """[{"source", "target"}] from two line-aligned text files (gzipped or not)."""
  paths = [Path(os.fspath(source_file)), Path(os.fspath(reference_file))]
  for path in paths:
    if not path.is_file():
      raise NotFound(f"{path} does not exist")
  sources, targets = (list(_read_lines(p)) for p in paths)
  if len(sources) != len(targets):
    raise ConfigError(f"{paths[0]} has {len(sources)} lines but {paths[1]} has {len(targets)}; "
                      "parallel files must be line-aligned")
  return [{"source": a, "target": b} for a, b in zip(sources, targets)]


def read_labelled_tsv(path: Path, label_column: str, text_columns: str | Sequence[str],
                      label_names: Sequence[str]) -> Iterator[tuple[str, int]]:
  """(text, label index) per data line of a headed TSV file; checks every label."""
  label_names = tuple(label_names)
  lines = _read_lines(path)
  header = next(lines, None)
  if header is None:
    raise ConfigError(f"{path} is empty; a header line naming the columns is needed.")
  header = header.split("\t")
  label_at = _column(header, (label_column,), "label", path)
  text_at = _column(header, _as_names(text_columns), "text", path)
  for number, line in enumerate(lines, start=2):
    fields = line.split("\t")
    if len(fields) != len(header):
      raise ConfigError(f"{path} line {number} has {len(fields)} tab-separated fields; the "
                        f"header has {len(header)} ({header}).")
    label = fields[label_at]
    if label not in label_names:
      raise ConfigError(f"{path} line {number}: label {label!r} is not one of the configured "
                        f"labels {list(label_names)}.")
    yield fields[text_at], label_names.index(label)


@dataclasses.dataclass
class LabelledTsvConfig(tfds.core.BuilderConfig):
  directory: str = ""
  label_column: str = "label"
  # Candidates, first present wins: SST-2's dev.tsv calls the text "content", train.tsv
  # "sentence".
  text_columns: tuple[str, ...] = ("content",)
  label_names: tuple[str, ...] = ("0", "1")


class LabelledTsvFiles(tfds.core.GeneratorBasedBuilder):
  """{split}.tsv files with a header; `text` and `label` (index into label_names)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Headed TSV files, labels checked against the label set."}

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    return None  # As ParallelTextFiles.

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"Labelled text from {config.directory}.",
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "label": tfds.features.ClassLabel(names=list(config.label_names)),
        }),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    config = self.builder_config
    files = tsv_files(config.directory)
    for path in files.values():  # Every label and column checked before anything is written.
      for _ in read_labelled_tsv(path, config.label_column, config.text_columns,
                                 config.label_names):
        pass
    return {split: self._generate_examples(path) for split, path in files.items()}

  def _generate_examples(self, path: Path):
    config = self.builder_config
    rows = read_labelled_tsv(path, config.label_column, config.text_columns,
                             config.label_names)
    for index, (text, label) in enumerate(text_corpus.counted(rows)):
      yield index, {"text": text, "label": label}


def _prepare_local(builder: tfds.core.DatasetBuilder) -> tfds.core.DatasetBuilder:
  text_corpus.prepare(builder, f"task data {builder.builder_config.directory}")  # once
  return builder


def parallel_builder(directory: str | os.PathLike, src_lang: str, tgt_lang: str, *,
                     data_dir: str | None = None) -> ParallelTextFiles:
  """The prepared tfds builder of a parallel-text directory."""
  directory = Path(directory).expanduser()
  pairs = parallel_files(directory, src_lang, tgt_lang)
  files = [f for pair in pairs.values() for f in pair]
  config = ParallelTextConfig(
      name=(f"{_slug(directory.name)}_{_slug(src_lang)}_{_slug(tgt_lang)}_"
            f"{_fingerprint(directory, files, src_lang, tgt_lang)}"),
      directory=str(directory.resolve()), src_lang=src_lang, tgt_lang=tgt_lang,
      description=f"{src_lang}-{tgt_lang} sentences from {directory}.")
  return _prepare_local(ParallelTextFiles(config=config, data_dir=data_dir,
                                          file_format="array_record"))


def labelled_builder(directory: str | os.PathLike, label_names: Sequence[str], *,
                     label_column: str = "label",
                     text_column: str | Sequence[str] = "content",
                     data_dir: str | None = None) -> LabelledTsvFiles:
  """The prepared tfds builder of a directory of labelled TSV files."""
  directory = Path(directory).expanduser()
  label_names = tuple(str(n) for n in label_names)
  if len(label_names) < 2 or len(set(label_names)) != len(label_names):
    raise ConfigError(f"label_names must be at least two distinct labels; got {list(label_names)}.")
  text_columns = _as_names(text_column)
  files = list(tsv_files(directory).values())
  config = LabelledTsvConfig(
      name=(f"{_slug(directory.name)}_"
            f"{_fingerprint(directory, files, label_column, text_columns, label_names)}"),
      directory=str(directory.resolve()), label_column=label_column,
      text_columns=text_columns, label_names=label_names,
      description=f"Labelled text from {directory}.")
  return _prepare_local(LabelledTsvFiles(config=config, data_dir=data_dir,
                                         file_format="array_record"))


def _read_split(builder: tfds.core.DatasetBuilder, split: str, where: str,
                max_examples: int | None) -> list[dict]:
  if split not in builder.info.splits:
    raise ConfigError(f"{where} has no split {split!r}; it has {sorted(builder.info.splits)}.")
  source = builder.as_data_source(split=split)
  count = len(source) if max_examples is None else min(len(source), max_examples)
  return list(source.__getitems__(range(count))) if count else []


def _check_max(max_examples: int | None) -> None:
  if max_examples is not None and max_examples < 1:
    raise ConfigError(f"max_examples must be positive or None; got {max_examples}.")


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


# ----------------------------------------------------------------------------- catalog


# tfds names: dataset[/config][:version], the dataset in snake case.
_CATALOG_NAME = re.compile(r"[a-z][a-z0-9_]*(/[A-Za-z0-9_.-]+)?(:[0-9.*]+)?")


def is_local(source: str | os.PathLike) -> bool:
  """An existing path, or anything that cannot be a tfds name (so a missing directory
  is reported as missing), is local data; the rest is taken for a catalog name."""
  if Path(source).expanduser().exists():
    return True
  return not _CATALOG_NAME.fullmatch(os.fspath(source))


def _local_alternative(kind: str) -> str:
  layouts = {"parallel": "files {split}.{lang}[.gz], one sentence per line, like "
                         "multi30k/train.en.gz and multi30k/train.fr.gz",
             "labelled": "{split}.tsv files with a header line, like sst2/train.tsv"}
  return (f"Pass a local directory instead (task.source = a directory holding "
          f"{layouts[kind]}).")


def catalog_builder(name: str, *, data_dir: str | None, kind: str) -> tfds.core.DatasetBuilder:
  """A prepared catalog builder; TaskDataUnavailableError when it cannot be had here."""
  family = name.split("/")[0].split(":")[0]
  if family in _CATALOG_MODULES:
    importlib.import_module(_CATALOG_MODULES[family])  # Registers the builder.
  try:
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  except (tfds.core.registered.DatasetNotFoundError, ValueError) as e:
    raise TaskDataUnavailableError(
        f"{name!r} is neither an existing directory nor a tfds catalog dataset. "
        + _local_alternative(kind)) from e
  if builder.is_prepared():
    return builder
  if not text_corpus.tensorflow_installed():
    raise TaskDataUnavailableError(
        f"tfds catalog dataset {name!r} is not prepared in {builder.data_dir}, and preparing "
        "it needs TensorFlow (and internet access), which this machine lacks. "
        + _local_alternative(kind)
        + " Or prepare it as array_record on a machine with TensorFlow and set "
        "task.tfds_data_dir to that copy.")
  try:
    builder.download_and_prepare(file_format="array_record")
  except Exception as e:  # pylint: disable=broad-except
    raise TaskDataUnavailableError(
        f"Downloading or preparing tfds catalog dataset {name!r} failed "
        f"({type(e).__name__}: {e}). Offline: " + _local_alternative(kind)) from e
  return builder


# ----------------------------------------------------------------------------- public


def load_parallel(source: str | os.PathLike, split: str, src_lang: str, tgt_lang: str, *,
                  data_dir: str | None = None,
                  max_examples: int | None = None) -> list[dict[str, str]]:
  """[{"source": str, "target": str}] of one split, in file order.

  `source` is a directory in the Multi30k layout or a tfds translation dataset
  (e.g. "wmt14_translate/fr-en", whose fields are the language codes).
  """
  _check_max(max_examples)
  if is_local(source):
    builder = parallel_builder(source, src_lang, tgt_lang, data_dir=data_dir)
    rows = _read_split(builder, split, str(source), max_examples)
    return [{"source": _text(r["source"]), "target": _text(r["target"])} for r in rows]
  builder = catalog_builder(str(source), data_dir=data_dir, kind="parallel")
  fields = list(builder.info.features)
  for lang in (src_lang, tgt_lang):
    if lang not in fields:
      raise ConfigError(f"tfds dataset {source} has no field for language {lang!r}; it has "
                        f"{fields}.")
  rows = _read_split(builder, split, f"tfds dataset {source}", max_examples)
  return [{"source": _text(r[src_lang]), "target": _text(r[tgt_lang])} for r in rows]


def load_labelled(source: str | os.PathLike, split: str, label_names: Sequence[str], *,
                  label_field: str = "label",
                  text_field: str | Sequence[str] | None = None,
                  data_dir: str | None = None,
                  max_examples: int | None = None) -> list[dict]:
  """[{"text": str, "label": int}] of one split, in file order; label indexes label_names.

  `source` is a directory of headed TSV files (labels written as the strings in
  `label_names`) or a tfds classification dataset such as "glue/sst2" (ClassLabel
  indices, which must lie in [0, len(label_names))). `text_field` may list candidates,
  the first present being used; None means ("content", "sentence") for TSV files, and
  the catalog dataset's text field otherwise.
  """
  _check_max(max_examples)
  label_names = tuple(str(n) for n in label_names)
  if is_local(source):
    builder = labelled_builder(source, label_names, label_column=label_field,
                               text_column=text_field or ("content", "sentence"),
                               data_dir=data_dir)
    rows = _read_split(builder, split, str(source), max_examples)
    return [{"text": _text(r["text"]), "label": int(r["label"])} for r in rows]
  builder = catalog_builder(str(source), data_dir=data_dir, kind="labelled")
  fields = list(builder.info.features)
  candidates = _as_names(text_field or _CATALOG_TEXT_FIELDS.get(str(source), "text"))
  text_key = next((c for c in candidates if c in fields), None)
  if text_key is None or label_field not in fields:
    raise ConfigError(f"tfds dataset {source} lacks the text field {candidates} or the label "
                      f"field {label_field!r}; it has {fields}.")
  rows = _read_split(builder, split, f"tfds dataset {source}", max_examples)
  examples = []
  for index, r in enumerate(rows):
    label = int(r[label_field])
    if not 0 <= label < len(label_names):  # e.g. glue's unlabelled test split (-1)
      raise ConfigError(f"tfds dataset {source} split {split} example {index}: label {label} "
                        f"is not an index into the configured labels {list(label_names)}.")
    examples.append({"text": _text(r[text_key]), "label": label})
  return examples


def load_jsonl(directory: str | os.PathLike, split: str, *,
               max_examples: int | None = None) -> list[dict]:
  """The objects of DIR/{split}.jsonl[.gz], one JSON object a line (for SFT data).

  Read directly, without tfds: the fields are whatever the objects hold.
  """
  _check_max(max_examples)
  directory = Path(directory).expanduser()
  _check_directory(directory)
  path = next((directory / f"{split}{s}" for s in JSONL_SUFFIXES
               if (directory / f"{split}{s}").is_file()), None)
  if path is None:
    found = sorted(p.name for p in directory.iterdir() if p.name.endswith(JSONL_SUFFIXES))
    raise NotFound(f"{directory} has no {split}.jsonl[.gz]; JSONL files there: {found}.")
  examples = []
  for number, line in enumerate(_read_lines(path), start=1):
    if max_examples is not None and len(examples) == max_examples:
      break
    if not line.strip():
      continue
    try:
      example = json.loads(line)
    except json.JSONDecodeError as e:
      raise ConfigError(f"{path} line {number} is not JSON: {e}.") from None
    if not isinstance(example, dict):
      raise ConfigError(f"{path} line {number} is a JSON {type(example).__name__}, not an object.")
    examples.append(example)
  return examples


def has_jsonl(directory: str | os.PathLike, split: str) -> bool:
  directory = Path(directory).expanduser()
  return any((directory / f"{split}{s}").is_file() for s in JSONL_SUFFIXES)


def jsonl_splits(directory: str | os.PathLike) -> list[str]:
  """Splits of a directory of {split}.jsonl[.gz] files."""
  names = (p.name for p in Path(directory).expanduser().iterdir())
  return sorted({n[: -len(s)] for n in names for s in JSONL_SUFFIXES if n.endswith(s)})
