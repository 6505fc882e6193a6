r"""Writes an offline teacher: its top-k logits over the training rows, to ArrayRecord.

  python -m kd.cache_teacher --config=configs/shakespeare/distill.py --workdir=DIR [--k=64] \
      [--out=...]

Trains (or restores) the teacher in DIR/teacher exactly as `kd.main` would, runs it once over the
packed training rows in a fixed order, and writes DIR/teacher_cache (rows + top-k ids, logits and
the full-vocabulary logsumexp at the config's temperature). For a config of the llm job
(config.job='llm') the teacher is its checkpoint and the rows are the first train.steps batches
of the KD run's own stream (kd.jobs.llm.write_cache). With `config.chunk_size > 0` the
teacher's logits are made and reduced `chunk_size` tokens at a time. Then distil from the
cache, without running the teacher in the train step:
  python -m kd.main --config=... --workdir=DIR --config.teacher.cache=DIR/teacher_cache
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from kd import data as data_lib
from kd.data import lm_data
from kd.data import teacher_cache
from kd.train import build
from kd.train import compile_cache
from kd.train import config_check
from kd.train import offline_teacher
from kd.train import run

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'The run directory (holds teacher/).')
_K = flags.DEFINE_integer('k', 64, 'Teacher logits kept per token.')
_OUT = flags.DEFINE_string('out', None, 'Cache directory; default <workdir>/teacher_cache.')
_CACHE = compile_cache.define_flag()
flags.mark_flags_as_required(['config', 'workdir'])


def write_cache(config, workdir: str, *, k: int, out: str | None = None) -> str:
  config_check.check(config)
  low = offline_teacher.cache_temperature(config)
  data = lm_data.LMData(config, workdir)
  teacher = build.build_model(config.teacher.model, data.vocab_size)
  if not 0 < k <= teacher.config.vocab_size:
    raise config_check.ConfigError(f'--k={k} must be in [1, vocab size {teacher.config.vocab_size}]')
  teacher_params, _ = run.train_teacher(config, data, teacher, workdir)
  batches = data_lib.make_lm_dataset(
      data.student_source, data.tokenizer, seq_len=config.data.seq_len,
      batch_size=config.data.batch_size, seed=config.seed, shuffle=False, repeat=False)
  out = out or f'{workdir}/teacher_cache'
  rows = offline_teacher.cache_rows(teacher, teacher_params, batches, k=k, temperature=low,
                    chunk_size=int(config.get('chunk_size', 0)))
  n = teacher_cache.write(rows, out, k=k, temperature=low, vocab_size=teacher.config.vocab_size)
  print(f'wrote {n} rows with the teacher top-{k} to {out}')
  return out


def main(argv):
  del argv
  compile_cache.enable_flag(_CACHE)
  writer = write_cache
  if _CONFIG.value.get('job') == 'llm':  # a pretrained teacher over the llm job's rows
    from kd.jobs import llm  # pylint: disable=g-import-not-at-top
    writer = llm.write_cache
  writer(_CONFIG.value, _WORKDIR.value, k=_K.value, out=_OUT.value)


if __name__ == '__main__':
  app.run(main)
