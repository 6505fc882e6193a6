"""kd.xla_flags: the defaults kd.main adds to XLA_FLAGS, and what a user's own settings keep."""

from kd import xla_flags


def test_the_defaults_join_what_is_there():
  env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}
  assert xla_flags.apply(env) == list(xla_flags.DEFAULTS)
  assert env['XLA_FLAGS'].split() == ['--xla_force_host_platform_device_count=2',
                                      *xla_flags.DEFAULTS]
  assert xla_flags.apply(env) == []  # twice: nothing more


def test_a_users_own_value_of_a_flag_wins_and_the_defaults_can_be_turned_off():
  mine = '--xla_cpu_experimental_ynn_fusion_type=dot,eltwise'
  env = {'XLA_FLAGS': mine}
  assert xla_flags.apply(env) == [] and env['XLA_FLAGS'] == mine
  env = {xla_flags.OFF_ENV: '0'}
  assert xla_flags.apply(env) == [] and 'XLA_FLAGS' not in env
  env = {}
  xla_flags.apply(env)
  assert env['XLA_FLAGS'] == ' '.join(xla_flags.DEFAULTS)
