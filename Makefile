# The two commands of the README. Each one sets up .venv first when needed
# (tools/install.sh is idempotent: seconds when the environment is ready).
PY := .venv/bin/python

.PHONY: demo test install lint

install:
	bash tools/install.sh

demo: install
	$(PY) tools/demo.py

test: install
	$(PY) -m ruff check gplq_mmdet tools tests configs
	$(PY) -m pytest -q tests

lint: install
	$(PY) -m ruff check gplq_mmdet tools tests configs
