"""kd.data.local (fetch, and the readers' on-demand path) against archives built here from the
local corpora (file:// URLs: the same download, extraction and checks as over HTTPS)."""

import dataclasses
import io
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile

import pytest

from kd.data import local
from kd.data import sentences
from kd.data import sources

DATA = pathlib.Path(os.environ.get('KD_DATA_DIR', pathlib.Path(__file__).parents[2] / 'shared/data'))


def _archive(path, members: dict[str, bytes]):
  with tarfile.open(path, 'w:gz') as tar:
    for name, data in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def mirror(tmp_path):
  """FILES with their URLs pointing at local copies: the STS-B archive as upstream lays it out
  (with its test split), Tiny Shakespeare as the plain file."""
  sts = {f'stsbenchmark/{n}': (DATA / 'stsbenchmark' / n).read_bytes()
         for n in ('sts-train.csv', 'sts-dev.csv', 'LICENSE.txt', 'readme.txt')}
  sts['stsbenchmark/sts-test.csv'] = b'not kept\n'
  _archive(tmp_path / 'Stsbenchmark.tar.gz', sts)
  urls = {local.STSB_URL: (tmp_path / 'Stsbenchmark.tar.gz').as_uri(),
          local.SHAKESPEARE_URL: (DATA / 'tinyshakespeare' / 'input.txt').as_uri()}
  return {k: dataclasses.replace(r, url=urls[r.url]) for k, r in local.FILES.items()}


def test_fetch_writes_the_layout_sources_read_and_keeps_it(tmp_path, mirror, monkeypatch):
  to = tmp_path / 'data'
  status = local.fetch(str(to), mirror)
  assert set(status.values()) == {'downloaded'}
  for rel in local.FILES:
    assert (to / rel).read_bytes() == (DATA / rel).read_bytes(), rel
  assert not (to / 'stsbenchmark' / 'sts-test.csv').exists()
  monkeypatch.setenv(local.DATA_DIR_ENV, str(to))
  assert sources.read('shakespeare')[0]['text'] == (DATA / 'tinyshakespeare/input.txt').read_text()
  # Again: every file is kept, nothing is downloaded (the URLs now lead nowhere).
  gone = {k: dataclasses.replace(r, url=(tmp_path / 'missing').as_uri()) for k, r in mirror.items()}
  assert set(local.fetch(str(to), gone).values()) == {'kept'}


def test_a_changed_download_or_local_file_is_refused_and_nothing_is_overwritten(tmp_path, mirror):
  bad = tmp_path / 'bad.tar.gz'
  _archive(bad, {'stsbenchmark/sts-train.csv': b'changed\n'})
  files = {k: r for k, r in mirror.items() if k == 'stsbenchmark/sts-train.csv'}
  files = {k: dataclasses.replace(r, url=bad.as_uri()) for k, r in files.items()}
  with pytest.raises(sources.DataError, match='expected 0f71910b'):
    local.fetch(str(tmp_path / 'a'), files)
  assert not (tmp_path / 'a' / 'stsbenchmark' / 'sts-train.csv').exists()

  files = {k: dataclasses.replace(r, member='stsbenchmark/sts-dev.csv') for k, r in files.items()}
  with pytest.raises(sources.DataError, match='holds no readable stsbenchmark/sts-dev.csv'):
    local.fetch(str(tmp_path / 'a'), files)

  mine = tmp_path / 'b' / 'tinyshakespeare' / 'input.txt'
  mine.parent.mkdir(parents=True)
  mine.write_text('my own corpus')
  with pytest.raises(sources.DataError, match='exists with SHA-256'):
    local.fetch(str(tmp_path / 'b'), mirror)
  assert mine.read_text() == 'my own corpus'

  with pytest.raises(sources.DataError, match='could not download'):
    local.fetch(str(tmp_path / 'c'), {k: dataclasses.replace(r, url=(tmp_path / 'no').as_uri())
                                      for k, r in mirror.items()})


def _files(root):
  return sorted(str(p.relative_to(root)) for p in pathlib.Path(root).rglob('*') if p.is_file())


@pytest.fixture
def fresh_home(tmp_path, monkeypatch):
  """$HOME/.cache/kd/data under tmp_path: the data folder of a machine without KD_DATA_DIR."""
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  return tmp_path / 'home' / '.cache' / 'kd' / 'data'


def test_readers_fetch_a_missing_corpus_into_the_data_folder(mirror, fresh_home, monkeypatch):
  want_dev = sentences.load(['stsb:dev'])  # from KD_DATA_DIR (conftest: ../shared/data)
  want_pairs = sources.read('stsb_paraphrase:dev')
  monkeypatch.delenv(local.DATA_DIR_ENV)
  monkeypatch.setattr(local, 'FILES', mirror)
  assert local.data_dir() == str(fresh_home)
  assert sentences.load(['stsb:dev']) == want_dev
  # The archive's other files came with it; Tiny Shakespeare is not fetched until read.
  sts = sorted(k for k in local.FILES if k.startswith('stsbenchmark/'))
  assert _files(fresh_home) == sts
  assert sources.read('stsb_paraphrase:dev') == want_pairs
  shakespeare = (DATA / 'tinyshakespeare/input.txt').read_text()
  assert sources.read('shakespeare')[0]['text'] == shakespeare
  assert _files(fresh_home) == sorted(local.FILES)
  # A file already there is read as it is, never fetched or checked again.
  gone = {k: dataclasses.replace(r, url=(fresh_home / 'no').as_uri()) for k, r in mirror.items()}
  monkeypatch.setattr(local, 'FILES', gone)
  assert sentences.stsb_path('train') == str(fresh_home / 'stsbenchmark' / 'sts-train.csv')


def test_offline_the_error_names_the_folder_and_leaves_nothing_there(
    tmp_path, mirror, fresh_home, monkeypatch):
  gone = {k: dataclasses.replace(r, url=(tmp_path / 'no').as_uri()) for k, r in mirror.items()}
  monkeypatch.setattr(local, 'FILES', gone)
  monkeypatch.delenv(local.DATA_DIR_ENV)
  for read in (lambda: sentences.load(['stsb:dev']), lambda: sources.read('shakespeare')):
    with pytest.raises(sources.DataError) as e:
      read()
    message = str(e.value)
    for words in (str(fresh_home), 'KD_DATA_DIR is not set', 'stsbenchmark/sts-dev.csv',
                  'tinyshakespeare/input.txt', 'python -m kd.data.fetch --to=DIR'):
      assert words in message, (words, message)
  assert not fresh_home.exists() or not _files(fresh_home)

  mine = tmp_path / 'mine'
  monkeypatch.setenv(local.DATA_DIR_ENV, str(mine))
  with pytest.raises(sources.DataError, match=re.escape(f'data folder {mine} (from $KD_DATA_DIR)')):
    sentences.stsb_path('train')
  assert not mine.exists() or not _files(mine)


def test_the_command_line_reports_a_complete_folder_without_downloading(tmp_path):
  to = tmp_path / 'data'
  for rel in local.FILES:
    (to / rel).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(DATA / rel, to / rel)
  out = subprocess.run([sys.executable, '-m', 'kd.data.fetch', f'--to={to}'], check=True,
                       capture_output=True, text=True, cwd=pathlib.Path(__file__).parents[1],
                       timeout=120).stdout.splitlines()
  assert sorted(out[:-1]) == sorted(f'kept       {to / rel}' for rel in local.FILES)
  assert out[-1] == f'export KD_DATA_DIR={to}'
