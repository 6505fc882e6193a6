"""The `:arg` of a config file (`--config=configs/x.py:tiny,objective=jsd`), parsed by one rule.

  ARGS = {'tiny': bool, 'objective': str, 'qat': int}
  args = config_args.parse(arg, ARGS)        # {'tiny': True, 'objective': 'jsd'}

Comma-separated; a bool arg is given bare (`tiny`), any other as `name=value`, converted to its
type. An unknown name, a repeated one, a bool given a value or a value arg given none is a
ValueError that lists the valid args. `conflicts` names groups of args of which at most one may
be given (e.g. two ways to choose the PEFT method); `requires` maps an arg to one it needs.

Config files are loaded by path, not imported, so the experiments of one directory reach the
base they share with `sibling`, by their own location, whatever the working directory:

  base = config_args.sibling(__file__, 'base')   # configs/shakespeare/base.py
"""

from __future__ import annotations

import importlib.util
import os
import types


def sibling(file: str, name: str) -> types.ModuleType:
  """The module `name`.py in the directory of `file` (a config file's `__file__`), loaded anew."""
  path = os.path.join(os.path.dirname(os.path.abspath(os.fspath(file))), f'{name}.py')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{file} builds on {path}, which is missing; keep the files of a '
                            'config directory together')
  spec = importlib.util.spec_from_file_location(f'kd_config_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def parse(arg: str | None, spec: dict[str, type], *, conflicts=(), requires=None) -> dict:
  valid = ', '.join(n if t is bool else f'{n}={t.__name__.upper()}' for n, t in spec.items())
  out = {}
  for token in (t.strip() for t in (arg or '').split(',')):
    if not token:
      continue
    name, eq, value = token.partition('=')
    if name not in spec:
      raise ValueError(f'unknown config arg {name!r} in {arg!r}; valid: {valid}')
    if name in out:
      raise ValueError(f'config arg {name!r} given twice in {arg!r}')
    kind = spec[name]
    if kind is bool:
      if eq:
        raise ValueError(f'config arg {name!r} takes no value (give it bare), got {token!r}')
      out[name] = True
      continue
    if not eq or not value:
      raise ValueError(f'config arg {name!r} needs a value: {name}={kind.__name__.upper()}')
    try:
      out[name] = kind(value)
    except ValueError:
      raise ValueError(f'config arg {token!r}: {value!r} is not of type {kind.__name__}') from None
  for group in conflicts:
    given = [n for n in group if n in out]
    if len(given) > 1:
      raise ValueError(f'config args {given} in {arg!r} choose the same thing; give one of them')
  for name, needed in (requires or {}).items():
    if name in out and needed not in out:
      raise ValueError(f'config arg {name!r} needs {needed!r} too; add it to {arg!r}')
  return out
