# The two commands of the README. Each builds .venv first (idempotent: scripts/setup_env.sh).
PY := .venv/bin/python

.PHONY: setup demo test
setup:
	@bash scripts/setup_env.sh

demo: setup
	$(PY) -m spark_sglang.demo

# PYTHONWARNINGS: a SWIG module's DeprecationWarning at interpreter exit would print after pytest's
# summary; pytest still reports warnings raised inside tests.
# tests/test_qwen.py needs Qwen2.5-Coder-1.5B (a 1.1 GB download, once; cached afterwards).
test: setup
	$(PY) -m spark_sglang.models fetch qwen2.5-coder-1.5b
	PYTHONWARNINGS=ignore::DeprecationWarning $(PY) -m pytest -q
