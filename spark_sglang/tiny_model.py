"""A tiny random-weight Llama (GQA) with a byte-level BPE tokenizer, built locally.

The embedded default model of the demo, examples and engine tests: no download, a few MB, fast on
CPU. Real Llama geometry in miniature: RoPE, RMSNorm, SwiGLU, grouped-query attention.
"""

from __future__ import annotations

import glob
import os

DEFAULT_DIR = os.path.join(os.path.expanduser("~"), ".cache", "spark-sglang", "tiny-llama-v1")


def build_tiny_llama(path: str = DEFAULT_DIR, *, head_dim: int = 32, num_layers: int = 2) -> str:
    """Create the model at ``path`` unless it is already there; returns ``path``."""
    if os.path.exists(os.path.join(path, "model.safetensors")):
        return path
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tmp = f"{path}.tmp-{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    # Tokenizer: byte-level BPE trained on the Python standard library's sources.
    files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))[:60]
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    tokenizer.train(files, trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    # A chat template so the OpenAI chat API works on the tiny model too.
    hf_tokenizer.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant: {% endif %}"
    )
    hf_tokenizer.save_pretrained(tmp)

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=4096,
        rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=bos,
        eos_token_id=tokenizer.token_to_id("</s>"), pad_token_id=tokenizer.token_to_id("<pad>"),
        tie_word_embeddings=False, torch_dtype="float32",
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # a wider init than the default, so greedy text is not one token repeated
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 2.0 / p.shape[-1] ** 0.5)
    model.save_pretrained(tmp, safe_serialization=True)
    os.replace(tmp, path) if not os.path.exists(path) else None
    return path
