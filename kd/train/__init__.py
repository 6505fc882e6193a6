"""Training: state, the pure steps, the loop, checkpoints, and the jobs configs select."""

# config.job -> the module whose main(config, workdir) runs it (kd.main dispatches on it).
JOBS = {'lm': 'kd.train.run', 'sentence_embedding': 'kd.train.sentence', 'llm': 'kd.jobs.llm'}
