"""The offline corpora: where they live, where they come from, and fetching one that is missing.

The data folder is `$KD_DATA_DIR`, else `~/.cache/kd/data`, laid out like `../shared/data`:
`tinyshakespeare/input.txt` (char-rnn's Tiny Shakespeare, the file TFDS's tiny_shakespeare reads)
and `stsbenchmark/sts-{train,dev}.csv` with STS Benchmark's licence and readme. `path(rel)` gives
a file of that folder; a known file that is missing is downloaded first, with the other files of
its archive. Each download is checked against the SHA-256 of the copy kd's results were measured
on and written atomically, so a failed one leaves nothing behind. STS-B's test split is not kept:
tune on dev. Offline, the error names the folder, the files it needs and how to fill it
(`python -m kd.data.fetch --to=DIR` on a machine with internet).

Only the standard library is imported here, so every reader can import it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import tarfile
import tempfile
import urllib.request

DATA_DIR_ENV = 'KD_DATA_DIR'
DEFAULT_DIR = '~/.cache/kd/data'
# Seconds without a byte before a download gives up: the command line waits longer than a reader
# that finds a file missing, so that an offline job fails within a minute rather than hanging.
FETCH_TIMEOUT = 60.0
ON_DEMAND_TIMEOUT = 15.0

SHAKESPEARE_URL = ('https://raw.githubusercontent.com/karpathy/char-rnn/master/data/'
                   'tinyshakespeare/input.txt')
STSB_URL = 'https://ixa2.si.ehu.eus/stswiki/images/4/48/Stsbenchmark.tar.gz'


class DataError(ValueError):
  """A data source that cannot be read as asked; the message names it and what to do."""


@dataclasses.dataclass(frozen=True)
class Remote:
  url: str
  sha256: str
  member: str = ''  # the file inside a .tar.gz at `url` ('' : `url` is the file)


FILES = {
    'tinyshakespeare/input.txt': Remote(
        SHAKESPEARE_URL, '86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed'),
    'stsbenchmark/sts-train.csv': Remote(
        STSB_URL, '0f71910b59aa1ad973c5897f0791f3b0965a92b8f82b1a95f3eea9f4162fda82',
        'stsbenchmark/sts-train.csv'),
    'stsbenchmark/sts-dev.csv': Remote(
        STSB_URL, '5d7e944d8b02734b07bfdb5df67db3420c64bed153fcaa1ba47ad03480cf4234',
        'stsbenchmark/sts-dev.csv'),
    'stsbenchmark/LICENSE.txt': Remote(
        STSB_URL, '3dfc3217395f8c5dd05c5f8995f25fe2f8fd258e6dd770b3de480749caee8c70',
        'stsbenchmark/LICENSE.txt'),
    'stsbenchmark/readme.txt': Remote(
        STSB_URL, 'e9488363d211c32ca5e912954f16eb9233cfed1b5b4b0475d0d812d35d7c8ef1',
        'stsbenchmark/readme.txt'),
}


def data_dir() -> str:
  """The data folder: $KD_DATA_DIR, else ~/.cache/kd/data."""
  return os.path.expanduser(os.environ.get(DATA_DIR_ENV) or DEFAULT_DIR)


def path(rel: str, timeout: float = ON_DEMAND_TIMEOUT) -> str:
  """`<data folder>/<rel>`; a known file (a key of FILES) that is missing is downloaded there
  first, with the other files of its archive. Raises DataError, naming the folder, when that
  download fails."""
  root = data_dir()
  target = os.path.join(root, rel)
  if os.path.exists(target) or rel not in FILES:
    return target
  url = FILES[rel].url
  missing = {r: f for r, f in FILES.items()
             if f.url == url and not os.path.exists(os.path.join(root, r))}
  try:
    fetch(root, missing, timeout=timeout)
  except DataError as e:
    how = (f'from ${DATA_DIR_ENV}' if os.environ.get(DATA_DIR_ENV)
           else f'{DATA_DIR_ENV} is not set')
    raise DataError(
        f'{rel} is not in the data folder {root} ({how}) and fetching it failed: {e}. On a '
        'machine with internet, `python -m kd.data.fetch --to=DIR` downloads every file into '
        f'DIR; copy DIR here, or set {DATA_DIR_ENV}=DIR') from None
  return target


def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def _download(url: str, timeout: float) -> bytes:
  try:
    with urllib.request.urlopen(url, timeout=timeout) as r:
      return r.read()
  except OSError as e:
    raise DataError(
        f'could not download {url} ({e}); fetch it by hand, or set {DATA_DIR_ENV} to a '
        f'folder holding {", ".join(sorted(FILES))}') from None


def _member(archive: bytes, url: str, name: str) -> bytes:
  try:
    with tarfile.open(fileobj=io.BytesIO(archive), mode='r:gz') as tar:
      f = tar.extractfile(name)
      if f is None:
        raise KeyError(name)
      return f.read()
  except (KeyError, tarfile.TarError, EOFError, OSError) as e:
    raise DataError(f'{url} holds no readable {name} ({e!r}): a partial download or '
                    'another archive; run again, or fetch it by hand') from None


def _write(path: str, data: bytes) -> None:
  """Writes `path` atomically: a reader sees the whole file or none."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with tempfile.NamedTemporaryFile(dir=os.path.dirname(path), delete=False) as tmp:
    try:
      tmp.write(data)
    except BaseException:
      tmp.close()
      os.unlink(tmp.name)
      raise
  os.replace(tmp.name, path)


def fetch(to: str, files: dict[str, Remote] | None = None,
          timeout: float = FETCH_TIMEOUT) -> dict:
  """Puts every file of `files` (default FILES) under `to`; returns {path: 'kept' |
  'downloaded'}. A file there with other bytes is refused, never overwritten."""
  files = FILES if files is None else files
  status, fetched = {}, {}
  for rel, remote in files.items():
    dest = os.path.join(to, rel)
    if os.path.exists(dest):
      with open(dest, 'rb') as f:
        got = _sha256(f.read())
      if got != remote.sha256:
        raise DataError(
            f'{dest} exists with SHA-256 {got}, not the {remote.sha256} of {remote.url}'
            f'{" (" + remote.member + ")" if remote.member else ""}; move it away to fetch the '
            'original, or keep using it by leaving this folder alone')
      status[dest] = 'kept'
      continue
    if remote.url not in fetched:
      fetched[remote.url] = _download(remote.url, timeout)
    data = fetched[remote.url]
    if remote.member:
      data = _member(data, remote.url, remote.member)
    if _sha256(data) != remote.sha256:
      raise DataError(
          f'{remote.url}{" (" + remote.member + ")" if remote.member else ""} has SHA-256 '
          f'{_sha256(data)}, expected {remote.sha256}: a changed or damaged file; nothing was '
          f'written to {dest}')
    _write(dest, data)
    status[dest] = 'downloaded'
  return status


def read_text(path: str) -> str:
  """The file as UTF-8 text; a clear error naming the file and the offset of a bad byte."""
  if not os.path.isfile(path):
    raise DataError(f'no file {path}; check the data source path')
  with open(path, 'rb') as f:
    raw = f.read()
  try:
    return raw.decode('utf-8')
  except UnicodeDecodeError as e:
    raise DataError(f'{path} is not UTF-8: byte {raw[e.start]:#04x} at offset {e.start} '
                    f'({e.reason}); convert the file (e.g. iconv -t UTF-8)') from None
