r"""The offline corpora (kd.data.local.FILES), downloaded into the data folder in one go.

  python -m kd.data.fetch [--to=DIR]     # default: $KD_DATA_DIR, else ~/.cache/kd/data

Tiny Shakespeare and STS Benchmark train and dev with its licence land where kd.data.local.path
finds them (`tinyshakespeare/input.txt`, `stsbenchmark/sts-{train,dev}.csv`): readers fetch a
missing file themselves, and this fills a folder ahead of time, e.g. on a machine with internet for
one without. Each file is checked against the SHA-256 of the copy kd's results were measured on and
written atomically; a file already there with those bytes is kept without a download.
"""

from __future__ import annotations

from absl import app
from absl import flags

from kd.data import local

_TO = flags.DEFINE_string('to', None, f'Destination folder (default ${local.DATA_DIR_ENV}, '
                          f'else {local.DEFAULT_DIR}).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  to = _TO.value or local.data_dir()
  for path, what in local.fetch(to).items():
    print(f'{what:10s} {path}')
  print(f'export {local.DATA_DIR_ENV}={to}')


if __name__ == '__main__':
  app.run(main)
