"""The optimizer and learning-rate schedule from `config.optimizer`."""

import optax

from kd.train import schedules

# optimizer.mu_dtype (Adam's first moment, e.g. 'bfloat16' to halve it; default: the params').
OPTIMIZERS = {
    'adamw': lambda lr, c: optax.adamw(lr, b1=c.get('b1', 0.9), b2=c.get('b2', 0.999),
                                       eps=c.get('eps', 1e-8), mu_dtype=c.get('mu_dtype'),
                                       weight_decay=c.get('weight_decay', 0.0)),
    'adam': lambda lr, c: optax.adam(lr, b1=c.get('b1', 0.9), b2=c.get('b2', 0.999),
                                     eps=c.get('eps', 1e-8), mu_dtype=c.get('mu_dtype')),
    'sgd': lambda lr, c: optax.sgd(lr, momentum=c.get('momentum', None)),
    'lion': lambda lr, c: optax.lion(lr, weight_decay=c.get('weight_decay', 0.0)),
}


SCHEDULES = ('cosine', 'linear', 'constant')  # optimizer.schedule: the decay after warmup


def learning_rate(opt_cfg, total_steps: int) -> schedules.Schedule:
  """Linear warmup then cosine / linear decay / constant, as `opt_cfg.schedule` says."""
  lr = float(opt_cfg['lr'])
  warmup = int(opt_cfg.get('warmup_steps', 0))
  kind = opt_cfg.get('schedule', 'cosine')
  end = lr * float(opt_cfg.get('end_lr_factor', 0.0))
  decay = {'cosine': optax.cosine_decay_schedule(lr, max(total_steps - warmup, 1), end / lr if lr else 0.0),
           'linear': optax.linear_schedule(lr, end, max(total_steps - warmup, 1)),
           'constant': optax.constant_schedule(lr)}
  if kind not in decay:
    raise ValueError(f'optimizer.schedule {kind!r} unknown; valid: {sorted(decay)}')
  if warmup == 0:
    return decay[kind]
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay[kind]], [warmup])


def make(opt_cfg, total_steps: int, skip_nonfinite: int = 0):
  """Returns (optax transformation, learning-rate schedule). `skip_nonfinite` > 0: an update
  whose gradient holds NaN/Inf is not applied (optax.apply_if_finite), up to that many in a row."""
  name = opt_cfg.get('name', 'adamw')
  if name not in OPTIMIZERS:
    raise ValueError(f'optimizer.name {name!r} unknown; valid: {sorted(OPTIMIZERS)}')
  mu_dtype = opt_cfg.get('mu_dtype')
  if mu_dtype is not None and (name not in ('adam', 'adamw')
                               or mu_dtype not in ('float32', 'bfloat16', 'float16')):
    raise ValueError(f'optimizer.mu_dtype={mu_dtype!r} needs name adam/adamw and one of '
                     "'float32', 'bfloat16', 'float16' (or None: the params' dtype).")
  lr_fn = learning_rate(opt_cfg, total_steps)
  chain = []
  if opt_cfg.get('grad_clip_norm'):
    chain.append(optax.clip_by_global_norm(float(opt_cfg['grad_clip_norm'])))
  chain.append(OPTIMIZERS[name](lr_fn, opt_cfg))
  tx = optax.chain(*chain)
  if skip_nonfinite:
    tx = optax.apply_if_finite(tx, max_consecutive_errors=int(skip_nonfinite))
  return tx, lr_fn
