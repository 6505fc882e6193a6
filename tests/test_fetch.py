"""kd.data.fetch against archives built here from the local corpora (file:// URLs: the same
download, extraction and checks as over HTTPS)."""

import dataclasses
import io
import os
import pathlib
import tarfile

import pytest

from kd.data import fetch
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
  urls = {fetch.STSB_URL: (tmp_path / 'Stsbenchmark.tar.gz').as_uri(),
          fetch.SHAKESPEARE_URL: (DATA / 'tinyshakespeare' / 'input.txt').as_uri()}
  return {k: dataclasses.replace(r, url=urls[r.url]) for k, r in fetch.FILES.items()}


def test_fetch_writes_the_layout_sources_read_and_keeps_it(tmp_path, mirror, monkeypatch):
  to = tmp_path / 'data'
  status = fetch.fetch(str(to), mirror)
  assert set(status.values()) == {'downloaded'}
  for rel in fetch.FILES:
    assert (to / rel).read_bytes() == (DATA / rel).read_bytes(), rel
  assert not (to / 'stsbenchmark' / 'sts-test.csv').exists()
  monkeypatch.setenv(sources.DATA_DIR_ENV, str(to))
  assert sources.read('shakespeare')[0]['text'] == (DATA / 'tinyshakespeare/input.txt').read_text()
  # Again: every file is kept, nothing is downloaded (the URLs now lead nowhere).
  gone = {k: dataclasses.replace(r, url=(tmp_path / 'missing').as_uri()) for k, r in mirror.items()}
  assert set(fetch.fetch(str(to), gone).values()) == {'kept'}


def test_a_changed_download_or_local_file_is_refused_and_nothing_is_overwritten(tmp_path, mirror):
  bad = tmp_path / 'bad.tar.gz'
  _archive(bad, {'stsbenchmark/sts-train.csv': b'changed\n'})
  files = {k: r for k, r in mirror.items() if k == 'stsbenchmark/sts-train.csv'}
  files = {k: dataclasses.replace(r, url=bad.as_uri()) for k, r in files.items()}
  with pytest.raises(sources.DataError, match='expected 0f71910b'):
    fetch.fetch(str(tmp_path / 'a'), files)
  assert not (tmp_path / 'a' / 'stsbenchmark' / 'sts-train.csv').exists()

  files = {k: dataclasses.replace(r, member='stsbenchmark/sts-dev.csv') for k, r in files.items()}
  with pytest.raises(sources.DataError, match='holds no readable stsbenchmark/sts-dev.csv'):
    fetch.fetch(str(tmp_path / 'a'), files)

  mine = tmp_path / 'b' / 'tinyshakespeare' / 'input.txt'
  mine.parent.mkdir(parents=True)
  mine.write_text('my own corpus')
  with pytest.raises(sources.DataError, match='exists with SHA-256'):
    fetch.fetch(str(tmp_path / 'b'), mirror)
  assert mine.read_text() == 'my own corpus'

  with pytest.raises(sources.DataError, match='could not download'):
    fetch.fetch(str(tmp_path / 'c'), {k: dataclasses.replace(r, url=(tmp_path / 'no').as_uri())
                                      for k, r in mirror.items()})
