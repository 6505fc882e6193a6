"""Jobs: one short module per kind of run, each a `main(config, workdir)` that kd.main selects
by config.job (kd.train.JOBS)."""
