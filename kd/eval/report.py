"""Result tables over seeds: mean ± std cells, and writing a table with its plot."""

import os
from typing import Callable

import numpy as np


def mean_std(values, scale: float = 1.0, digits: int = 2) -> str:
  """'m ± s' of `values` × scale (s: the sample std, ddof=1); just 'm' for a single value."""
  v = np.asarray(values, np.float64) * scale
  if len(v) == 1:
    return f'{v[0]:.{digits}f}'
  return f'{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}'


def write(out_dir: str, stem: str, text: str, plot: Callable[[str], None] | None = None) -> None:
  """Writes <out_dir>/<stem>.md (and <stem>.png through `plot(path)`), then prints the table."""
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, f'{stem}.md'), 'w') as f:
    f.write(text + '\n')
  if plot is not None:
    plot(os.path.join(out_dir, f'{stem}.png'))
  print(text)
