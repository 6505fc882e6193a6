"""Every relative link in the README and docs/ leads to a file that exists (anchors not checked)."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
LINK = re.compile(r'\]\(([^)\s]+)\)')


def _relative_links(path: pathlib.Path) -> list[str]:
  return [l.split('#')[0] for l in LINK.findall(path.read_text())
          if not re.match(r'[a-z]+:', l) and not l.startswith('#')]


def test_relative_links_resolve():
  pages = [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]
  broken = [f'{p.relative_to(ROOT)}: {l}' for p in pages for l in _relative_links(p)
            if not (p.parent / l).exists()]
  assert not broken, broken
  assert sum(len(_relative_links(p)) for p in pages) > 50  # the reader finds the links


def test_the_link_reader(tmp_path):
  page = tmp_path / 'p.md'
  page.write_text('[a](docs/x.md#h) [b](https://x.org/y) [c](#top) ![d](img.png)')
  assert _relative_links(page) == ['docs/x.md', 'img.png']
