"""Text corpora as random-access sources of documents (one `str` per record).

A corpus file (from a `data_dir` argument, else the data folder of
`kd.data.local`: `$KD_DATA_DIR`, else `~/.cache/kd/data`, where a missing file
is downloaded on first use) is turned into a TFDS dataset written as ArrayRecord
by `TinyShakespeareSpeeches`, a `tfds.core.GeneratorBasedBuilder`, and read back
with `builder.as_data_source` (random access, usable as a grain source). Writing
and reading ArrayRecord through TFDS needs no TensorFlow; this module never
imports it.

Tiny Shakespeare is split like TFDS's `tiny_shakespeare`: the first 90% of the
characters are train, the next 5% validation, the last 5% test. Each record is
one speech (a blank-line-separated paragraph) of its split, so that packed
sequences carry meaningful segments. A speech cut by a split boundary gives its
two halves to the two splits.

Building is idempotent and safe to race: TFDS writes into an `incomplete.*`
directory and renames it into place; a process that loses the rename finds the
winner's copy and reads that. The cache is keyed by the SHA-256 of the input
file, so a changed file is rebuilt rather than silently reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections.abc import Sequence
from typing import Any

from etils import epath
import tensorflow_datasets as tfds

from kd.data import local

DEFAULT_CACHE_DIR = "~/.cache/kd/tfds"
SPLITS = ("train", "validation", "test")

# One or more blank lines (possibly holding spaces) separate speeches.
_PARAGRAPH_BREAK = re.compile(r"\r?\n(?:[ \t]*\r?\n)+")


def split_speeches(text: str) -> list[str]:
  """Cuts text at blank lines; drops empty pieces and surrounding newlines."""
  pieces = (p.strip("\r\n") for p in _PARAGRAPH_BREAK.split(text))
  return [p for p in pieces if p.strip()]


def split_text(text: str) -> dict[str, str]:
  """The 90/5/5 character split of TFDS's `tiny_shakespeare`."""
  i = int(len(text) * 0.9)
  train, rest = text[:i], text[i:]
  j = int(len(rest) * 0.5)
  return {"train": train, "validation": rest[:j], "test": rest[j:]}


class TinyShakespeareSpeeches(
    tfds.core.GeneratorBasedBuilder, skip_registration=True
):
  """Tiny Shakespeare from a local `input.txt`, one speech per record."""

  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Pass the folder holding `input.txt` (Tiny Shakespeare) as"
      " `tfds.download.DownloadConfig(manual_dir=...)`."
  )

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS computes this through `importlib_resources`, which it declares only
    # for Python < 3.9 (tensorflow/datasets#11212); this is the same answer.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Tiny Shakespeare, one speech per record.",
        features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
        # Keep the speeches in reading order; shuffling is the pipeline's job.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    text = local.read_text(str(dl_manager.manual_dir / "input.txt"))
    return {
        name: self._generate_examples(part)
        for name, part in split_text(text).items()
    }

  def _generate_examples(self, text: str):
    for i, speech in enumerate(split_speeches(text)):
      yield i, {"text": speech}


@dataclasses.dataclass(frozen=True)
class _Corpus:
  builder_cls: type[tfds.core.GeneratorBasedBuilder]
  local_file: str  # relative to the data folder; a key of local.FILES


CORPORA = {
    "tiny_shakespeare": _Corpus(
        builder_cls=TinyShakespeareSpeeches,
        local_file="tinyshakespeare/input.txt",
    ),
}


@dataclasses.dataclass(frozen=True)
class TextSource:
  """Random access to documents as `str`; grain's RandomAccessDataSource."""

  records: Sequence[Any]  # a TFDS data source ({'text': bytes}) or strs

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int) -> str:
    record = self.records[index]
    if isinstance(record, dict):
      record = record["text"]
    if isinstance(record, bytes):
      record = record.decode("utf-8")
    return record

  def __iter__(self):
    return (self[i] for i in range(len(self)))


def _file_digest(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()[:16]


def build_local(
    corpus: str, data_dir: str | None = None, cache_dir: str | None = None
) -> tfds.core.DatasetBuilder:
  """Prepares (once) and returns the ArrayRecord builder of a local corpus.

  The corpus file is read from `data_dir`, else from the data folder of
  `kd.data.local` (downloaded there first when missing).
  """
  spec = _corpus(corpus)
  if data_dir is None:
    path = local.path(spec.local_file)
  else:
    path = os.path.join(os.path.expanduser(data_dir), spec.local_file)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"{corpus}: no file at {path!r}. Pass data_dir= the folder holding"
        f" {spec.local_file!r}, or leave it unset to read the data folder"
        f" (${local.DATA_DIR_ENV}, else {local.DEFAULT_DIR}), fetched on demand."
    )
  cache_dir = os.path.expanduser(cache_dir or DEFAULT_CACHE_DIR)
  builder_dir = os.path.join(cache_dir, f"{corpus}-{_file_digest(path)}")

  def make():
    return spec.builder_cls(data_dir=builder_dir, file_format="array_record")

  builder = make()
  if builder.is_prepared():
    return builder
  text = local.read_text(path)  # a clear error for bytes that are not UTF-8
  empty = [name for name, part in split_text(text).items() if not split_speeches(part)]
  if empty:
    raise local.DataError(
        f"{path} ({len(text)} characters) leaves the {', '.join(empty)} split(s) without text"
        " (train, validation and test are its first 90%, next 5% and last 5%): give a longer"
        " file")
  try:
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            manual_dir=os.path.dirname(path)
        )
    )
  except OSError:
    # Another process renamed its finished copy into place first.
    if not make().is_prepared():
      raise
  # A fresh builder reads the split metadata of whichever copy won.
  return make()


def load_text_split(
    name: str,
    split: str,
    *,
    data_dir: str | None = None,
    cache_dir: str | None = None,
) -> TextSource:
  """Documents of one split of a corpus, as a random-access source of `str`.

  Args:
    name: corpus name, a key of `CORPORA`.
    split: 'train', 'validation' or 'test' (TFDS slicing such as
      'train[:10%]' works too).
    data_dir: folder holding the raw files; defaults to the data folder of
      `kd.data.local` (`$KD_DATA_DIR`, else `~/.cache/kd/data`), where a
      missing file is downloaded first.
    cache_dir: where the local ArrayRecord copy is written; defaults to
      `~/.cache/kd/tfds`.
  """
  _corpus(name)
  check_split(split)
  builder = build_local(name, data_dir or None, cache_dir)
  return TextSource(builder.as_data_source(split=split))


def check_split(split: str) -> None:
  """Refuses, reading nothing, a split that load_text_split cannot read: SPLITS, sliced and
  joined as TFDS writes them ('train[:90%]', 'train[:10%]+validation')."""
  for part in split.split("+"):
    base = part.strip().split("[", 1)[0]
    if base not in SPLITS:
      raise ValueError(f"unknown split {base!r}; use {', '.join(SPLITS)}, sliced as "
                       "'train[:90%]' or joined as 'train[:10%]+validation'")
  try:
    tfds.core.ReadInstruction.from_spec(split)
  except (ValueError, AssertionError) as e:
    reason = str(e).strip().splitlines()[-1]
    raise ValueError(f"not a split TFDS can read ({reason}); write slices as 'train[:90%]' or "
                     "'train[100:200]'") from None


def _corpus(name: str) -> _Corpus:
  if name not in CORPORA:
    raise ValueError(f"Unknown corpus {name!r}; valid names: {sorted(CORPORA)}.")
  return CORPORA[name]
