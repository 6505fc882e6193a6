"""LoRA (kd.peft, via qwix) against independent numpy references; qwix QAT/PTQ on the Decoder."""

import dataclasses
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix

from kd import models
from kd import peft
from kd.models import Decoder, DecoderConfig, init_params

CFG = DecoderConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    intermediate_size=48, max_seq_len=16)
LCFG = peft.LoraConfig(target=r'layers_\d+/(attn/(q_proj|v_proj)|mlp/down_proj)', rank=4,
                       alpha=8.0)
# qwix 0.1.8 checks nnx.VariableState, which flax 0.12 deprecates, on every intercepted op.
pytestmark = pytest.mark.filterwarnings('ignore:.*VariableState:DeprecationWarning')
IDS = (jnp.arange(16, dtype=jnp.int32).reshape(2, 8) * 7) % 64


def _flat(tree):
  return flax.traverse_util.flatten_dict(tree)


def _setup(cfg=CFG, lcfg=LCFG):
  base = init_params(cfg, jax.random.key(0))
  model = peft.lora_model(Decoder(cfg), lcfg)
  lora = peft.init_lora(model, base, jax.random.key(1), lcfg)
  return base, model, lora


def _randomize(lora, seed=2):
  flat = _flat(lora)
  keys = jax.random.split(jax.random.key(seed), len(flat))
  return flax.traverse_util.unflatten_dict(
      {k: 0.2 * jax.random.normal(r, v.shape, v.dtype) for r, (k, v) in zip(keys, flat.items())})


def _numpy_merge(base, lora, scale):
  """W + scale * A @ B per adapted kernel, in float64 numpy."""
  out = {k: np.asarray(v, np.float64) for k, v in _flat(base).items()}
  flat_lora = _flat(lora)
  for k, a in flat_lora.items():
    if k[-1] == 'kernel_lora_a':
      b = flat_lora[(*k[:-1], 'kernel_lora_b')]
      out[(*k[:-1], 'kernel')] += scale * np.asarray(a, np.float64) @ np.asarray(b, np.float64)
  return flax.traverse_util.unflatten_dict(
      {k: v.astype(np.float32) for k, v in out.items()})


def test_adapters_on_the_targets_only():
  base, _, lora = _setup()
  paths = sorted('/'.join(k) for k in _flat(lora))
  expected = sorted(f'params/layers_{i}/{m}/kernel_lora_{ab}' for i in range(2)
                    for m in ('attn/q_proj', 'attn/v_proj', 'mlp/down_proj') for ab in 'ab')
  assert paths == expected
  for k, v in _flat(lora).items():
    w = _flat(base)[(*k[:-1], 'kernel')]
    want = (w.shape[0], LCFG.rank) if k[-1].endswith('_a') else (LCFG.rank, w.shape[1])
    assert v.shape == want and v.dtype == w.dtype, (k, v.shape)
    if k[-1].endswith('_b'):  # B starts at zero, A does not
      assert not np.any(np.asarray(v))
    else:
      assert np.any(np.asarray(v))


def test_zero_b_gives_the_base_logits():
  base, model, lora = _setup()
  got = model.apply(peft.combine(lora, base), IDS)['logits']
  want = Decoder(CFG).apply(base, IDS)['logits']
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize('tie', [False, True])
def test_lora_forward_equals_base_on_numpy_merged_params(tie):
  cfg = dataclasses.replace(CFG, tie_embeddings=tie)
  # Untied: the LM head gets an adapter too; tied: the head is `embed.attend`, not a kernel.
  target = LCFG.target if tie else r'.*(q_proj|v_proj|down_proj|lm_head)'
  lcfg = dataclasses.replace(LCFG, target=target)
  base, model, lora = _setup(cfg, lcfg)
  lora = _randomize(lora)
  got = model.apply(peft.combine(lora, base), IDS)['logits']
  merged = _numpy_merge(base, lora, lcfg.alpha / lcfg.rank)
  want = Decoder(cfg).apply(merged, IDS)['logits']
  plain = Decoder(cfg).apply(base, IDS)['logits']
  assert np.abs(np.asarray(want - plain)).max() > 1e-2  # the adapters do change the model
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)


def test_merge_matches_numpy_and_is_a_plain_decoder_tree():
  lcfg = dataclasses.replace(LCFG, target=r'.*(_proj|lm_head)')
  base, model, lora = _setup(lcfg=lcfg)
  lora = _randomize(lora)
  merged = peft.merge(peft.combine(lora, base), lcfg)
  assert jax.tree.structure(merged) == jax.tree.structure(base)
  want = _numpy_merge(base, lora, lcfg.scale)
  for k, v in _flat(want).items():
    np.testing.assert_allclose(np.asarray(_flat(merged)[k]), v, atol=1e-6, err_msg='/'.join(k))
  # The LM head alone, called by name (kd's chunked losses do this), keeps its adapter.
  out = model.apply(peft.combine(lora, base), IDS)
  head = model.apply(peft.combine(lora, base), out['hidden'], method='project')
  np.testing.assert_allclose(np.asarray(head), np.asarray(out['logits']), atol=1e-6)


def test_lora_on_scanned_layers():
  """scan_layers: qwix's adapters made inside the scan come stacked ([L, in, r], [L, r, out]);
  with the same values the scanned model equals the unrolled one, and merge does each layer."""
  lcfg = dataclasses.replace(LCFG, target=r'.*(q_proj|v_proj|down_proj|lm_head)')
  base, model, lora = _setup(lcfg=lcfg)
  lora = _randomize(lora)
  scanned = dataclasses.replace(CFG, scan_layers=True)
  smodel = peft.lora_model(Decoder(scanned), lcfg)
  sbase = models.stack_layers(base)
  fresh = peft.init_lora(smodel, sbase, jax.random.key(1), lcfg)
  shapes = {'/'.join(k): v.shape for k, v in _flat(fresh).items()}
  assert shapes['params/layers/attn/v_proj/kernel_lora_a'] == (2, 32, 4)
  assert shapes['params/layers/mlp/down_proj/kernel_lora_b'] == (2, 4, 32)
  assert shapes['params/lm_head/kernel_lora_a'] == (32, 4)
  assert not np.any(np.asarray(fresh['params']['layers']['attn']['q_proj']['kernel_lora_b']))
  slora = models.stack_layers(lora)
  got = smodel.apply(peft.combine(slora, sbase), IDS)['logits']
  want = model.apply(peft.combine(lora, base), IDS)['logits']
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6, rtol=1e-5)
  merged = peft.merge(peft.combine(slora, sbase), lcfg)
  jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-6), merged,
               models.stack_layers(peft.merge(peft.combine(lora, base), lcfg)))


def test_split_and_combine_round_trip():
  base, _, lora = _setup()
  full = peft.combine(lora, base)
  lora2, frozen = peft.split(full)
  assert all(peft.is_lora(k) for k in _flat(lora2))
  assert not any(peft.is_lora(k) for k in _flat(frozen))
  assert jax.tree.structure(frozen) == jax.tree.structure(base)
  assert jax.tree.structure(lora2) == jax.tree.structure(lora)
  back = peft.combine(lora2, frozen)
  assert jax.tree.structure(back) == jax.tree.structure(full)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(full)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match='overlap'):
    peft.combine(lora, full)


def test_gradients_reach_only_the_adapters():
  base, model, lora = _setup(dataclasses.replace(CFG, remat=True))

  @jax.jit
  def loss_grads(lora, frozen):
    def loss(lora):
      logits = model.apply(peft.combine(lora, frozen), IDS)['logits']
      return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])
    return jax.grad(loss)(lora)

  grads = loss_grads(lora, base)
  assert jax.tree.structure(grads) == jax.tree.structure(lora)
  for k, g in _flat(grads).items():
    assert np.all(np.isfinite(g))
    # d/dA = x^T g B^T is zero while B == 0; d/dB is not.
    assert np.any(np.asarray(g)) == k[-1].endswith('_b'), k


def test_bfloat16_compute_keeps_the_dtype():
  cfg = dataclasses.replace(CFG, dtype='bfloat16')
  base, model, lora = _setup(cfg)
  logits = model.apply(peft.combine(_randomize(lora), base), IDS)['logits']
  assert logits.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(logits, np.float32)))


def test_bad_configs_say_what_to_do():
  base = init_params(CFG, jax.random.key(0))
  bad = peft.LoraConfig(target='q_proj', rank=2, alpha=2.0)  # not a full-path match
  with pytest.raises(ValueError, match='matches no projection.*layers_0/attn'):
    peft.init_lora(peft.lora_model(Decoder(CFG), bad), base, jax.random.key(1), bad)
  with pytest.raises(ValueError, match='rank'):
    peft.LoraConfig(target='.*', rank=0, alpha=1.0)
  with pytest.raises(ValueError, match='not a valid regex'):
    peft.LoraConfig(target='(', rank=1, alpha=1.0)


# ------------------------------------------------------------------ qwix QAT / PTQ


def _qat(rule):
  return qwix.quantize_model(Decoder(CFG), qwix.QtProvider([rule]))


@pytest.mark.parametrize('qtype,tile,atol', [(jnp.int8, None, 1e-2), (jnp.int4, 16, 1e-1)])
def test_qat_fake_quant_is_close_and_straight_through(qtype, tile, atol):
  """int8 per-channel measured 2.6e-3, int4 block-16 2.5e-2 max |dlogit| (max |logit| 0.41)."""
  base = init_params(CFG, jax.random.key(0))
  rule = qwix.QtRule(module_path=r'.*(_proj|lm_head)', weight_qtype=qtype, tile_size=tile)
  qm = _qat(rule)
  assert jax.tree.structure(qm.init(jax.random.key(0), IDS)) == jax.tree.structure(base)
  ref = Decoder(CFG).apply(base, IDS)['logits']
  out = qm.apply(base, IDS)
  err = np.abs(np.asarray(out['logits'] - ref)).max()
  assert 0 < err < atol, err
  # Straight-through: d sum(logits * R) / d lm_head = hidden^T R, as if unquantized.
  r = jax.random.normal(jax.random.key(3), ref.shape)
  g = jax.grad(lambda p: jnp.sum(qm.apply(p, IDS)['logits'] * r))(base)
  want = np.einsum('btd,btv->dv', np.asarray(out['hidden']), np.asarray(r))
  np.testing.assert_allclose(np.asarray(g['params']['lm_head']['kernel']), want, atol=1e-4)
  assert all(np.all(np.isfinite(x)) and np.any(x) for x in jax.tree.leaves(g))


def test_ptq_int8_weights_match_qat_forward():
  base = init_params(CFG, jax.random.key(0))
  rule = qwix.QuantizationRule(module_path=r'.*_proj', weight_qtype=jnp.int8)
  pm = qwix.quantize_model(Decoder(CFG), qwix.PtqProvider([rule]))
  abstract = jax.eval_shape(pm.init, jax.random.key(0), IDS)
  qparams = qwix.quantize_params(base['params'], abstract['params'])
  q = qparams['layers_0']['attn']['q_proj']['kernel'].array
  assert q.qvalue.dtype == jnp.int8 and q.scale.shape == (1, CFG.hidden_size)  # per channel
  ptq = pm.apply({'params': qparams}, IDS)['logits']
  qat = _qat(qwix.QtRule(module_path=r'.*_proj', weight_qtype=jnp.int8)).apply(base, IDS)['logits']
  np.testing.assert_allclose(np.asarray(ptq), np.asarray(qat), atol=1e-5)
  with pytest.raises(ValueError, match='unquantized param'):
    pm.apply(base, IDS)


def test_head_projection_by_name_keeps_the_lm_head_adapter():
  # kd.models.decoder.project_with is what the chunked logit losses call.
  from kd.models.decoder import project_with  # pylint: disable=g-import-not-at-top
  lcfg = peft.LoraConfig(target=r'lm_head', rank=2, alpha=4.0)
  base = init_params(CFG, jax.random.key(0))
  model = peft.lora_model(Decoder(CFG), lcfg)
  variables = peft.combine(_randomize(peft.init_lora(model, base, jax.random.key(1), lcfg)), base)
  hidden = model.apply(variables, IDS, return_hidden_only=True)['hidden']
  np.testing.assert_allclose(np.asarray(project_with(model)(variables, hidden)),
                             np.asarray(model.apply(variables, IDS)['logits']), atol=1e-5)
  plain = Decoder(CFG).apply(base, IDS)['logits']
  assert float(jnp.max(jnp.abs(model.apply(variables, IDS)['logits'] - plain))) > 1e-2
