# The two commands a new machine needs: `make demo` (the main job) and `make test`.
PY ?= .venv/bin/python
export KD_DATA_DIR ?= $(abspath ../shared/data)
WORKDIR ?= /tmp/kd/minilm

.PHONY: install demo demo-lm test

install: .venv/.installed

.venv/.installed: setup.py
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: install
	$(PY) -m kd.main --config=configs/minilm_sts.py --workdir=$(WORKDIR)

demo-lm: install
	$(PY) -m kd.main --config=configs/shakespeare_kd.py --workdir=/tmp/kd/shakespeare

test: install
	$(PY) -m pytest -q -n 2 --durations=15 tests
