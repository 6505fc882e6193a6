r"""What the compressed-student tables share (experiments/compressed_lm.py, compressed_sts.py):
the post-training rows, the rows' labels and order, a student's stored size, and the table
written with its paired column and its plot of the metric against size.

Trained rows are `kd.main` runs (full fine-tuning, PEFT, QAT, QLoRA); post-training rows (POST)
quantize the full row's student with kd.quant. The table lists the teacher, the trained rows,
then the post-training ones (`row_order`); its Δ column is each row's metric minus the same
seed's full row's (kd.eval.report.paired).
"""

import os
import tempfile

import jax
import numpy as np

from kd import quant
from kd.eval import report

TARGET = r'.*_proj'  # the kernels every quantized row quantizes
CALIBRATION_BATCHES = 8  # GPTQ's and the mixed plan's
# The labels of the rows both tables have (the adapter, prefix and prompt rows are each script's).
LABELS = {'teacher': 'teacher', 'full': 'full fine-tuning', 'lora': 'LoRA r=8, every projection',
          'qat8': 'QAT int8, per channel', 'qat4': 'QAT int4, groups of 32',
          'qlora': 'QLoRA: LoRA r=8 on an int4 base (groups of 32)'}
# name -> (label, how): post-training rows made from the 'full' row's student.
POST = {
    'ptq8': ('PTQ int8 (RTN, per channel)', dict(bits=8, group_size=None)),
    'ptq4': ('PTQ int4 (RTN, groups of 32)', dict(bits=4, group_size=32)),
    'gptq4': ('GPTQ int4 (groups of 32)', dict(bits=4, group_size=32, gptq=True)),
    'mixed': ('mixed int4/int8 by measured sensitivity', dict(bits=4, group_size=32, mixed=0.25)),
    'ptq8_emb': ('PTQ int8, embedding tables too (per row)', dict(bits=8, group_size=None,
                                                                  embed_bits=8)),
    'ptq4_emb8': ('PTQ int4 (groups of 32) + int8 embedding tables',
                  dict(bits=4, group_size=32, embed_bits=8)),
}


def labels(own: dict) -> dict:
  """{row: label} of LABELS, POST and `own` ({row: label}; it wins)."""
  return {**LABELS, **{k: v[0] for k, v in POST.items()}, **own}


def post_config(row: str, group_size: int = 32) -> quant.QuantConfig:
  """A post-training row's QuantConfig (its mixed plan aside): groups of `group_size` where the
  row quantizes in groups."""
  how = POST[row][1]
  return quant.QuantConfig(target=TARGET, bits=how['bits'],
                           group_size=how['group_size'] and group_size,
                           embed_bits=how.get('embed_bits'))


def stored_bytes(params=None, qparams=None) -> int:
  """Bytes on disk: kd.quant's packed file for quantized params, else float32 params."""
  if qparams is None:
    return int(sum(np.asarray(x).size * 4 for x in jax.tree.leaves(params)))
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, 'student.safetensors')
    quant.save(path, qparams)
    return quant.size_on_disk(path)


def row_order(rows, trained, post) -> list[str]:
  """The table's rows: the teacher, the trained rows (full first when a post-training row
  needs it), then the post-training rows, each in `rows`' order."""
  trained = [r for r in rows if r in trained]
  post = [r for r in rows if r in post]
  return ['teacher', *(['full'] if post and 'full' not in trained else []), *trained, *post]


def write(out: str, stem: str, runs: dict, metric: str, order, table, ylabel: str,
          after=None) -> None:
  """<out>/<stem>.md, .png and .runs.json of `runs` ({seed: {row: result}}): `table(results)`
  of the rows in `order` with the paired column of `metric` against the full row, then the
  text `after()` returns; the plot is `metric` (labelled `ylabel`) against stored size."""
  results = report.by_row(report.paired(runs, metric, 'full'), order)
  report.write(out, stem, table(results) + ('\n\n' + after() if after else ''),
               lambda path: report.size_plot(results, path, metric, ylabel), runs=runs)
