r"""The offline corpora, downloaded into the KD_DATA_DIR layout on a machine that lacks them.

  python -m kd.data.fetch [--to=DIR]     # default: $KD_DATA_DIR, else ~/.cache/kd/data

Tiny Shakespeare (char-rnn's input.txt, the file TFDS's tiny_shakespeare reads) and STS Benchmark
train and dev with its licence land where kd.data.sources and kd.data.sentences read them
(`tinyshakespeare/input.txt`, `stsbenchmark/sts-{train,dev}.csv`). Each file is checked against
the SHA-256 of the copy kd's results were measured on and written atomically; a file already
there with those bytes is kept without a download. STS-B's test split is not kept: tune on dev.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import tarfile
import tempfile
import urllib.request

from absl import app
from absl import flags

from kd.data import sources

SHAKESPEARE_URL = ('https://raw.githubusercontent.com/karpathy/char-rnn/master/data/'
                   'tinyshakespeare/input.txt')
STSB_URL = 'https://ixa2.si.ehu.eus/stswiki/images/4/48/Stsbenchmark.tar.gz'


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


def default_dir() -> str:
  return os.environ.get(sources.DATA_DIR_ENV) or os.path.expanduser('~/.cache/kd/data')


def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def _download(url: str, timeout: float) -> bytes:
  try:
    with urllib.request.urlopen(url, timeout=timeout) as r:
      return r.read()
  except OSError as e:
    raise sources.DataError(
        f'could not download {url} ({e}); fetch it by hand, or set {sources.DATA_DIR_ENV} to a '
        f'folder holding {", ".join(sorted(FILES))}') from None


def _member(archive: bytes, url: str, name: str) -> bytes:
  try:
    with tarfile.open(fileobj=io.BytesIO(archive), mode='r:gz') as tar:
      f = tar.extractfile(name)
      if f is None:
        raise KeyError(name)
      return f.read()
  except (KeyError, tarfile.TarError, EOFError, OSError) as e:
    raise sources.DataError(f'{url} holds no readable {name} ({e!r}): a partial download or '
                            'another archive; run again, or fetch it by hand') from None


def fetch(to: str, files: dict[str, Remote] | None = None, timeout: float = 60.0) -> dict:
  """Puts every file of `files` (default FILES) under `to`; returns {path: 'kept' |
  'downloaded'}. A file there with other bytes is refused, never overwritten."""
  files = FILES if files is None else files
  status, fetched = {}, {}
  for rel, remote in files.items():
    path = os.path.join(to, rel)
    if os.path.exists(path):
      with open(path, 'rb') as f:
        got = _sha256(f.read())
      if got != remote.sha256:
        raise sources.DataError(
            f'{path} exists with SHA-256 {got}, not the {remote.sha256} of {remote.url}'
            f'{" (" + remote.member + ")" if remote.member else ""}; move it away to fetch the '
            'original, or keep using it by leaving this folder alone')
      status[path] = 'kept'
      continue
    if remote.url not in fetched:
      fetched[remote.url] = _download(remote.url, timeout)
    data = fetched[remote.url]
    if remote.member:
      data = _member(data, remote.url, remote.member)
    if _sha256(data) != remote.sha256:
      raise sources.DataError(
          f'{remote.url}{" (" + remote.member + ")" if remote.member else ""} has SHA-256 '
          f'{_sha256(data)}, expected {remote.sha256}: a changed or damaged file; nothing was '
          f'written to {path}')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=os.path.dirname(path), delete=False) as tmp:
      tmp.write(data)
    os.replace(tmp.name, path)
    status[path] = 'downloaded'
  return status


_TO = flags.DEFINE_string('to', None, f'Destination folder (default ${sources.DATA_DIR_ENV}, '
                          'else ~/.cache/kd/data).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  to = _TO.value or default_dir()
  for path, what in fetch(to).items():
    print(f'{what:10s} {path}')
  print(f'export {sources.DATA_DIR_ENV}={to}')


if __name__ == '__main__':
  app.run(main)
