# The two commands of the README. Each builds .venv first (idempotent: scripts/setup_env.sh).
PY := .venv/bin/python

.PHONY: setup demo test
setup:
	@bash scripts/setup_env.sh

demo: setup
	$(PY) -m spark_sglang.demo

test: setup
	$(PY) -m pytest -q
