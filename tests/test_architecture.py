"""The layers of docs/architecture.md hold in the code: every `kd` import is read from the source
(ast), and each package imports only the packages its layer allows; the map names every module."""

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
KD = ROOT / 'kd'

# package -> the kd packages it may import (docs/architecture.md's table).
BELOW = {
    'models': set(), 'losses': set(),
    'peft': {'models'},
    'data': {'models'},
    'hf': {'models', 'peft'},
    'quant': {'models', 'hf'},
    'eval': {'models', 'losses', 'data', 'quant'},
    'parallel': {'models'},
}
BELOW['train'] = set(BELOW) | set().union(*BELOW.values())
BELOW['jobs'] = BELOW['train'] | {'train', 'config_args'}
ENTRY = {'main', 'sweep', 'seeds', 'cache_teacher', 'config_args', 'xla_flags', '__init__'}


def _package(path: pathlib.Path) -> str:
  rel = path.relative_to(KD)
  return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _kd_imports(path: pathlib.Path) -> set[str]:
  """The kd packages (or top-level modules) `path` imports, function-level imports included."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      parts = node.module.split('.')
      if parts[0] == 'kd':
        out |= {a.name for a in node.names} if len(parts) == 1 else {parts[1]}
    elif isinstance(node, ast.Import):
      out |= {a.name.split('.')[1] for a in node.names if a.name.startswith('kd.')}
  return out


def _imports_by_package() -> dict[str, set[str]]:
  deps = {}
  for path in KD.rglob('*.py'):
    pkg = _package(path)
    deps.setdefault(pkg, set()).update(_kd_imports(path) - {pkg})
  return deps


def test_every_package_imports_only_the_layers_below_it():
  deps = _imports_by_package()
  unknown = set(deps) - set(BELOW) - ENTRY
  assert not unknown, f'packages without a layer: {unknown}; add them to the doc and to BELOW'
  bad = {p: sorted(d - BELOW[p]) for p, d in deps.items() if p in BELOW and d - BELOW[p]}
  assert not bad, f'imports that reach up a layer: {bad}'


def test_the_import_reader_sees_each_kind_of_import(tmp_path):
  src = tmp_path / 'm.py'
  src.write_text('import kd.models.decoder\nfrom kd import losses, peft\n'
                 'from kd.train import step\nimport numpy\nfrom . import x\n\n'
                 'def f():\n  from kd.quant import rtn\n')
  assert _kd_imports(src) == {'models', 'losses', 'peft', 'train', 'quant'}


def test_the_layer_table_is_the_one_in_the_doc():
  doc = (ROOT / 'docs' / 'architecture.md').read_text()
  for pkg, allowed in BELOW.items():
    row = re.search(rf'^\|[^|]*\|[^|]*`{pkg}`[^|]*\| (.*) \|$', doc, re.M)
    assert row, f'docs/architecture.md has no row for {pkg}'
    if pkg not in ('train', 'jobs'):
      names = set(re.findall(r'[a-z_]+', row.group(1))) - {'nothing', 'from', 'kd'}
      assert names == allowed, (pkg, names, allowed)


def test_the_map_names_every_module():
  doc = (ROOT / 'docs' / 'architecture.md').read_text()
  missing = [str(p.relative_to(ROOT)) for p in KD.rglob('*.py')
             if p.stem != '__init__' and not re.search(rf'`{p.stem}`', doc)]
  assert not missing, f'modules docs/architecture.md does not name: {missing}'
