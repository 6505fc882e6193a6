# The two commands a new machine needs: `make demo` (the main job) and `make test`.
PY ?= .venv/bin/python
export KD_DATA_DIR ?= $(abspath ../shared/data)
WORKDIR ?= /tmp/kd/shakespeare

.PHONY: install demo test

install: .venv/.installed

.venv/.installed: setup.py
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: install
	$(PY) -m kd.main --config=configs/shakespeare_kd.py --workdir=$(WORKDIR)

test: install
	$(PY) -m pytest -q -n 2 tests
