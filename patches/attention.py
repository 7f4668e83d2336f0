"""Seam: the ``spark`` name in SGLang's attention-backend registry and CLI choices."""

from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES
from sglang.srt.layers.attention.attention_registry import register_attention_backend

from spark_sglang.server_args import BACKEND_NAME


def _create(model_runner):
    from spark_sglang.backend import new_attention_backend

    return new_attention_backend(model_runner)


def install() -> None:
    if BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        ATTENTION_BACKEND_CHOICES.append(BACKEND_NAME)
    register_attention_backend(BACKEND_NAME)(_create)
