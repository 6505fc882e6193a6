"""Tests of kd.data against the real Tiny Shakespeare in $KD_DATA_DIR."""

import collections
import dataclasses
import os
import pathlib
import subprocess
import sys

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from kd import data
from kd.data import local

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA_DIR = os.environ.get(
    "KD_DATA_DIR", str(ROOT.parent / "shared" / "data")
)
INPUT = os.path.join(DATA_DIR, "tinyshakespeare", "input.txt")
SEQ_LEN = 64


# ---------------------------------------------------------------- fixtures --


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds_cache"))


@pytest.fixture(scope="module")
def raw_text():
  with open(INPUT, encoding="utf-8") as f:
    return f.read()


@pytest.fixture(scope="module")
def sources(cache_dir):
  return {
      split: data.load_text_split(
          "tiny_shakespeare", split, data_dir=DATA_DIR, cache_dir=cache_dir
      )
      for split in ("train", "validation", "test")
  }


@pytest.fixture(scope="module")
def tok(sources, tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tok"))
  return data.train_bpe(list(sources["train"]), 512, path)


@pytest.fixture(scope="module")
def val_docs(sources, tok):
  """Independently tokenized validation documents, `<bos> ids <eos>`."""
  return [
      [data.BOS_ID] + tok.encode(d, add_special_tokens=False).ids
      + [data.EOS_ID]
      for d in sources["validation"]
  ]


def expected_split(text):
  n = len(text)
  a = int(n * 0.9)
  b = a + int((n - a) * 0.5)
  return {"train": text[:a], "validation": text[a:b], "test": text[b:]}


def speeches_by_lines(text):
  """Speeches as runs of non-blank lines (independent of split_speeches)."""
  out, current = [], []
  for line in text.split("\n"):
    if line.strip():
      current.append(line)
    elif current:
      out.append("\n".join(current))
      current = []
  if current:
    out.append("\n".join(current))
  return out


def pieces_of(doc, seq_len):
  """Overlapping pieces, written differently from kd.data.split_long."""
  out, start = [], 0
  while True:
    out.append(list(doc[start : start + seq_len + 1]))
    if start + seq_len + 1 >= len(doc):
      return out
    start += seq_len


def greedy_rows(pieces, seq_len):
  """Rows of seq_len + 1 tokens filled in order, one bin (tokens, segments)."""
  rows, tokens, segments = [], [], []
  for piece in pieces:
    if len(tokens) + len(piece) > seq_len + 1:
      rows.append((tokens, segments))
      tokens, segments = [], []
    segments += [(segments[-1] + 1) if segments else 1] * len(piece)
    tokens += piece
  rows.append((tokens, segments))
  pad = lambda x: np.array(x + [0] * (seq_len + 1 - len(x)), np.int32)
  return [(pad(t), pad(s)) for t, s in rows]


def rows_of(batches):
  for b in batches:
    for i in range(len(b["input_ids"])):
      yield {k: v[i] for k, v in b.items()}


def assert_row_invariants(row):
  seg, pos = row["segment_ids"], row["positions"]
  mask, ids, labels = row["loss_mask"], row["input_ids"], row["labels"]
  n = int((seg > 0).sum())
  assert (seg[:n] > 0).all() and (seg[n:] == 0).all(), "padding only at end"
  assert (ids[n:] == 0).all() and (labels[n:] == 0).all() and (mask[n:] == 0).all()
  assert (np.diff(seg[:n]) >= 0).all() and (np.diff(seg[:n]) <= 1).all()
  if n:
    assert seg[0] == 1
  for s in range(1, int(seg.max(initial=0)) + 1):
    where = np.flatnonzero(seg == s)
    np.testing.assert_array_equal(pos[where], np.arange(len(where)))
    # Inside a segment a label is the next input; the end carries no label
    # except in the last column, whose next token lies outside the row.
    inner = where[:-1]
    np.testing.assert_array_equal(labels[inner], ids[inner + 1])
    assert (mask[inner] == 1).all()
    if where[-1] != len(seg) - 1:
      assert mask[where[-1]] == 0 and labels[where[-1]] == 0
  assert (labels[mask == 0] == 0).all()


# ----------------------------------------------------------------- text ----


def test_records_are_the_speeches_of_each_split(sources, raw_text):
  for split, part in expected_split(raw_text).items():
    assert list(sources[split]) == speeches_by_lines(part), split


def test_splits_partition_the_text_90_5_5(sources, raw_text):
  squash = lambda s: "".join(s.split())
  joined = "".join(
      squash("".join(sources[s])) for s in ("train", "validation", "test")
  )
  assert joined == squash(raw_text)
  total = len(squash(raw_text))
  for split, share in (("train", 0.9), ("validation", 0.05), ("test", 0.05)):
    got = len(squash("".join(sources[split]))) / total
    assert abs(got - share) < 0.005, (split, got)


def test_reading_needs_no_tensorflow(sources):
  assert isinstance(sources["train"][0], str)
  assert len(sources["train"]) > 6000
  assert "tensorflow" not in sys.modules


def test_build_is_idempotent_and_safe_to_race(tmp_path):
  script = (
      "import sys; from kd.data import load_text_split as f;"
      f"s = f('tiny_shakespeare', 'test', data_dir={DATA_DIR!r},"
      f" cache_dir={str(tmp_path)!r});"
      "print(len(s)); assert 'tensorflow' not in sys.modules"
  )
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  procs = [
      subprocess.Popen(
          [sys.executable, "-c", script], env=env, cwd=ROOT,
          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      )
      for _ in range(2)
  ]
  outs = [p.communicate(timeout=120) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-2000:]
  counts = [out.split()[-1] for out, _ in outs]  # TFDS also prints progress
  assert counts[0] == counts[1]
  versions = list(tmp_path.glob("*/tiny_shakespeare_speeches/*"))
  assert [v.name for v in versions] == ["1.0.0"], versions
  info = versions[0] / "dataset_info.json"
  before = info.stat().st_mtime_ns
  again = data.load_text_split(
      "tiny_shakespeare", "test", data_dir=DATA_DIR, cache_dir=str(tmp_path)
  )
  assert len(again) == int(counts[0])
  assert info.stat().st_mtime_ns == before


def _known_file_at(url: str) -> dict:
  """kd.data.local.FILES with Tiny Shakespeare's URL replaced (file://, no network)."""
  rel = "tinyshakespeare/input.txt"
  return {rel: dataclasses.replace(local.FILES[rel], url=url)}


def test_missing_file_says_where_it_looked(tmp_path, monkeypatch):
  with pytest.raises(FileNotFoundError) as err:
    data.load_text_split(
        "tiny_shakespeare", "train", data_dir=str(tmp_path), cache_dir=str(tmp_path)
    )
  assert str(tmp_path / "tinyshakespeare" / "input.txt") in str(err.value)
  # Without data_dir the data folder is tried, and offline the error names it.
  folder = tmp_path / "data"
  monkeypatch.setenv("KD_DATA_DIR", str(folder))
  monkeypatch.setattr(
      local, "FILES", _known_file_at((tmp_path / "nowhere").as_uri())
  )
  with pytest.raises(local.DataError) as err:
    data.load_text_split("tiny_shakespeare", "train", cache_dir=str(tmp_path))
  message = str(err.value)
  assert f"data folder {folder} (from $KD_DATA_DIR)" in message
  assert "tinyshakespeare/input.txt" in message
  assert "python -m kd.data.fetch --to=DIR" in message
  assert not folder.exists() or not [p for p in folder.rglob("*") if p.is_file()]


def test_unknown_names_list_the_valid_ones():
  with pytest.raises(ValueError, match="tiny_shakespeare"):
    data.load_text_split("shakespeare", "train", data_dir=DATA_DIR)
  with pytest.raises(ValueError, match="validation"):
    data.load_text_split("tiny_shakespeare", "dev", data_dir=DATA_DIR)


def test_without_kd_data_dir_the_corpus_is_fetched_into_the_cache(
    sources, cache_dir, tmp_path, monkeypatch
):
  """A fresh machine: ~/.cache/kd/data gets input.txt, and the documents are
  the same as from ../shared/data."""
  monkeypatch.delenv("KD_DATA_DIR", raising=False)
  monkeypatch.setenv("HOME", str(tmp_path))
  monkeypatch.setattr(local, "FILES", _known_file_at(pathlib.Path(INPUT).as_uri()))
  got = data.load_text_split("tiny_shakespeare", "validation", cache_dir=cache_dir)
  assert list(got) == list(sources["validation"])
  fetched = tmp_path / ".cache" / "kd" / "data" / "tinyshakespeare" / "input.txt"
  assert fetched.read_bytes() == pathlib.Path(INPUT).read_bytes()
  assert "tensorflow" not in sys.modules


# ------------------------------------------------------------ tokenizer ----


def test_tokenizer_round_trip_and_special_ids(tok, sources):
  lines = "\n".join(sources["validation"]).split("\n")[:3000]
  ids = data.encode_batch(tok, lines)
  assert all(tok.decode(i) == line for i, line in zip(ids, lines))
  assert tok.decode(data.encode_batch(tok, ["  two  spaces\n\n"])[0]) == (
      "  two  spaces\n\n"
  )
  assert [tok.token_to_id(t) for t in ("<pad>", "<bos>", "<eos>")] == [0, 1, 2]
  assert tok.get_vocab_size() == 512
  framed = data.encode_batch(tok, ["Romeo"], add_bos=True, add_eos=True)[0]
  assert framed[0] == data.BOS_ID and framed[-1] == data.EOS_ID
  assert data.decode(tok, framed) == "Romeo"


def test_tokenizer_training_is_deterministic(sources, tmp_path):
  texts = list(sources["validation"])
  a = data.train_bpe(texts, 400, str(tmp_path / "a"))
  b = data.train_bpe(texts, 400, str(tmp_path / "b"))
  assert a.get_vocab() == b.get_vocab()
  assert (tmp_path / "a" / "tokenizer.json").read_text() == (
      tmp_path / "b" / "tokenizer.json"
  ).read_text()


def test_get_or_train_trains_once_then_loads(sources, tmp_path):
  texts = list(sources["validation"])
  first = data.get_or_train(str(tmp_path), lambda: texts, 300)
  assert sorted(os.listdir(tmp_path)) == ["tokenizer.json"]  # no temp left

  def must_not_train():
    raise AssertionError("should have loaded tokenizer.json")

  again = data.get_or_train(str(tmp_path), must_not_train, 300)
  assert again.get_vocab() == first.get_vocab()
  with pytest.raises(ValueError, match="vocab_size"):
    data.get_or_train(str(tmp_path), must_not_train, 301)
  with pytest.raises(FileNotFoundError, match="train_bpe"):
    data.load_tokenizer(str(tmp_path / "nowhere"))


# ------------------------------------------------------------- pipeline ----


def test_unshuffled_batches_match_an_independent_packing(sources, tok, val_docs):
  """One bin, no shuffle: rows are the pieces packed greedily in order."""
  batch_size = 4
  ds = data.make_lm_dataset(
      sources["validation"], tok, seq_len=SEQ_LEN, batch_size=batch_size,
      seed=0, shuffle=False, repeat=False, packing_bins=1,
  )
  batches = list(ds)
  pieces = [p for d in val_docs for p in pieces_of(d, SEQ_LEN)]
  want = greedy_rows(pieces, SEQ_LEN)
  got = list(rows_of(batches))
  assert len(got) == len(want) // batch_size * batch_size  # last one dropped
  for row, (tokens, segs) in zip(got, want):
    assert set(row) == set(data.FEATURES)
    assert {k: v.dtype for k, v in row.items()} == {
        "input_ids": np.int32, "labels": np.int32, "loss_mask": np.float32,
        "segment_ids": np.int32, "positions": np.int32,
    }
    np.testing.assert_array_equal(row["input_ids"], tokens[:-1])
    np.testing.assert_array_equal(row["segment_ids"], segs[:-1])
    keep = (segs[:-1] == segs[1:]) & (segs[:-1] > 0)
    np.testing.assert_array_equal(row["loss_mask"], keep)
    np.testing.assert_array_equal(row["labels"], np.where(keep, tokens[1:], 0))
    assert_row_invariants(row)
  # The predicted tokens, in order, are the documents without their <bos>.
  predicted = np.concatenate(
      [r["labels"][r["loss_mask"] == 1] for r in got]
  ).tolist()
  stream = [t for d in val_docs for t in d[1:]]
  assert len(predicted) > 0.9 * len(stream)
  assert predicted == stream[: len(predicted)]


def test_shuffled_batches_keep_invariants_and_are_deterministic(sources, tok):
  kwargs = dict(seq_len=SEQ_LEN, batch_size=8, seed=7)
  it_a = data.make_iterator(sources["validation"], tok, **kwargs)
  it_b = data.make_iterator(sources["validation"], tok, **kwargs)
  it_c = data.make_iterator(sources["validation"], tok, **{**kwargs, "seed": 8})
  a = [next(it_a) for _ in range(40)]  # more than one epoch of validation
  b = [next(it_b) for _ in range(40)]
  c = next(it_c)
  for x, y in zip(a, b):
    for k in data.FEATURES:
      np.testing.assert_array_equal(x[k], y[k])
  assert not np.array_equal(a[0]["input_ids"], c["input_ids"])
  for batch in a:
    assert all(batch[k].shape == (8, SEQ_LEN) for k in data.FEATURES)
  for row in rows_of(a):
    assert_row_invariants(row)
  fill = np.mean([b["segment_ids"].astype(bool).mean() for b in a])
  assert fill > 0.85, fill


def test_shards_are_disjoint_and_cover_the_split(sources, tok, val_docs):
  count = 3
  shards = []
  for index in range(count):
    rows = rows_of(data.make_lm_dataset(
        sources["validation"], tok, seq_len=SEQ_LEN, batch_size=1, seed=0,
        shuffle=False, repeat=False, packing_bins=1, shard_index=index,
        shard_count=count,
    ))
    stream = np.concatenate([r["labels"][r["loss_mask"] == 1] for r in rows])
    docs = np.split(stream, np.flatnonzero(stream == data.EOS_ID) + 1)[:-1]
    shards.append([tuple(d.tolist()) for d in docs])
  for index, docs in enumerate(shards):
    assert docs == [tuple(d[1:]) for d in val_docs[index::count]]
  assert sum(len(s) for s in shards) == len(val_docs)
  with pytest.raises(ValueError, match="shard_index"):
    data.make_lm_dataset(
        sources["validation"], tok, seq_len=SEQ_LEN, batch_size=1, seed=0,
        shard_index=3, shard_count=3,
    )


def test_iterator_state_restores_the_exact_position(sources, tok):
  make = lambda: data.make_iterator(
      sources["validation"], tok, seq_len=SEQ_LEN, batch_size=4, seed=3
  )
  it = make()
  for _ in range(5):
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(3)]
  fresh = make()
  fresh.set_state(state)
  for w, g in zip(want, [next(fresh) for _ in range(3)]):
    for k in data.FEATURES:
      np.testing.assert_array_equal(w[k], g[k])


def test_iterator_round_trips_through_orbax(sources, tok, tmp_path):
  make = lambda: data.make_iterator(
      sources["validation"], tok, seq_len=SEQ_LEN, batch_size=4, seed=5
  )
  it = make()
  for _ in range(5):
    next(it)
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.save(
        5,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave({"w": np.arange(3.0)}),
            data=grain.checkpoint.CheckpointSave(it),
        ),
    )
    want = [next(it) for _ in range(3)]  # while the save may still run
    manager.wait_until_finished()
  fresh = make()
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    restored = manager.restore(
        manager.latest_step(),
        args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)),
    )
  assert restored["data"] is fresh
  for w, g in zip(want, [next(fresh) for _ in range(3)]):
    for k in data.FEATURES:
      np.testing.assert_array_equal(w[k], g[k])


def test_eval_batches_cover_every_token_once(sources, tok, val_docs):
  batch_size = 8
  batches = data.make_eval_batches(
      sources["validation"], tok, seq_len=SEQ_LEN, batch_size=batch_size
  )
  again = data.make_eval_batches(
      sources["validation"], tok, seq_len=SEQ_LEN, batch_size=batch_size
  )
  for x, y in zip(batches, again, strict=True):
    for k in data.FEATURES:
      np.testing.assert_array_equal(x[k], y[k])
  assert all(b[k].shape == (batch_size, SEQ_LEN) for b in batches for k in b)
  got = collections.Counter()
  for row in rows_of(batches):
    assert_row_invariants(row)
    for s in range(1, int(row["segment_ids"].max(initial=0)) + 1):
      where = row["segment_ids"] == s
      inputs = row["input_ids"][where].tolist()
      labels = row["labels"][where & (row["loss_mask"] == 1)].tolist()
      if len(labels) == len(inputs):  # piece runs into the last column
        got[tuple(inputs[:1] + labels)] += 1
      else:
        got[tuple(inputs)] += 1
  want = collections.Counter(
      tuple(p) for d in val_docs for p in pieces_of(d, SEQ_LEN)
  )
  assert got == want
  n_labels = sum(float(b["loss_mask"].sum()) for b in batches)
  assert n_labels == sum(len(d) - 1 for d in val_docs)
  assert not batches[-1]["segment_ids"][-1].any()  # padded with empty rows


@pytest.mark.parametrize("content,message", [
    (b"", r"\(0 characters\) leaves the train, validation, test split"),
    (b"one short line\n", "leaves the test split"),
    (b"Romeo:\nhello\n\n" * 50 + b"\xff\xfe bad\n", r"is not UTF-8: byte 0xff at offset 700"),
])
def test_a_bad_text_file_is_named_before_anything_is_built(tmp_path, content, message):
  (tmp_path / "tinyshakespeare").mkdir()
  (tmp_path / "tinyshakespeare" / "input.txt").write_bytes(content)
  with pytest.raises(local.DataError, match=message) as err:
    data.load_text_split("tiny_shakespeare", "train", data_dir=str(tmp_path),
                         cache_dir=str(tmp_path / "cache"))
  assert str(tmp_path / "tinyshakespeare" / "input.txt") in str(err.value)
  assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.array_record*"))
