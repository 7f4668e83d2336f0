"""Turn a GGUF file into an ordinary Hugging Face checkpoint folder, once, atomically.

``transformers`` reads a GGUF (dequantising its weights) but keeps a ``quantization_config`` that
SGLang does not serve. ``build_checkpoint`` copies the dequantised state dict into a fresh model of
the given class, saves it with the GGUF's tokenizer (chat template included) into a temporary
folder beside ``path`` and renames it into place, so an interrupted build leaves nothing that
looks complete.
"""

from __future__ import annotations

import json
import os
import shutil

CHECKPOINT_FILES = ("config.json", "tokenizer.json")


def checkpoint_complete(path: str) -> bool:
    if not all(os.path.isfile(os.path.join(path, f)) for f in CHECKPOINT_FILES):
        return False
    names = os.listdir(path)
    return "model.safetensors" in names or "model.safetensors.index.json" in names


def build_checkpoint(gguf: str, path: str, *, architecture: str, dtype: str, source: dict) -> str:
    """Build ``path`` from the GGUF file ``gguf`` unless it is already complete; returns ``path``.

    ``architecture``: the transformers class name (``LlamaForCausalLM``, ``Qwen2ForCausalLM``);
    ``dtype``: the saved weights' dtype (``float32`` keeps the dequantised values exactly);
    ``source``: what the checkpoint was built from, written to ``spark_sglang_source.json``.
    """
    if checkpoint_complete(path):
        return path
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch_dtype = getattr(torch, dtype)
    model_class = getattr(transformers, architecture)
    folder, name = os.path.split(gguf)
    tmp = f"{path}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        config = loaded.config.to_dict()
        config.pop("quantization_config", None)
        config["torch_dtype"] = dtype
        config = model_class.config_class.from_dict(config)
        model = model_class(config).to(torch_dtype)
        missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
        del loaded
        # Only a tied output head may be missing; it is the embedding, tied below.
        tied_head = config.tie_word_embeddings and all(key.endswith("lm_head.weight") for key in missing)
        if unexpected or (missing and not tied_head):
            raise RuntimeError(f"unexpected weights in {gguf}: missing {missing}, unexpected {unexpected}")
        model.tie_weights()
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "spark_sglang_source.json"), "w") as f:
            json.dump({**source, "gguf": name, "dtype": dtype}, f)
        if checkpoint_complete(path):  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
