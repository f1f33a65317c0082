# The two commands of the README. Each one sets up .venv first when needed
# (tools/install.sh is idempotent: seconds when the environment is ready).
PY := .venv/bin/python

.PHONY: demo test test-slow install lint

install:
	bash tools/install.sh

demo: install
	$(PY) tools/demo.py

# The suite without the tests marked slow (about 10 minutes on 2 cores);
# test-slow runs those: the quick benchmark and the demo's rerun (about 5).
test: install
	$(PY) -m ruff check gplq_mmdet tools tests configs
	$(PY) -m pytest -q -m "not slow" tests

test-slow: install
	$(PY) -m pytest -q -m slow tests

lint: install
	$(PY) -m ruff check gplq_mmdet tools tests configs
