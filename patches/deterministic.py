"""Seam: ``--enable-deterministic-inference`` with ``--attention-backend spark``.

SGLang accepts a backend in deterministic mode when it is on its deterministic list, and keeps the
radix cache on only for backends on its radix-capable list (others get ``--disable-radix-cache``).
``spark`` joins both through SGLang's plugin helpers. In the scheduler SGLang then enables its
batch-invariant ops (Triton kernels for ``aten::mm`` and friends, CUDA only): on a GPU that path
runs untouched; on a CPU, where SGLang's call would raise, SparK's row-count-independent CPU
matmuls (``spark_sglang.cpu_batch_invariant``) are installed instead. SparK's own part (a
request's last prompt query reads its prompt as stored, so a radix hit on a resent prompt equals
the cold run) is ``--spark-reproducible``, switched on by ``spark_config`` in deterministic mode.
"""

import os

from sglang.srt.arg_groups.choices import (
    DETERMINISTIC_ATTENTION_BACKEND_CHOICES,
    RADIX_SUPPORTED_DETERMINISTIC_ATTENTION_BACKEND,
    add_deterministic_attention_backend_choices,
    add_radix_supported_deterministic_attention_backend_choices,
)
from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from spark_sglang.patches.kv_pool import spark_enabled
from spark_sglang.server_args import BACKEND_NAME

TARGET = "sglang.srt.model_executor.model_runner.ModelRunner.maybe_enable_batch_invariant_mode"
#: ``0`` leaves CPU matmuls as ATen computes them in deterministic mode (to measure what they cost).
CPU_MATMUL_ENV = "SPARK_SGLANG_CPU_BATCH_INVARIANT"


def _maybe_enable_batch_invariant_mode(original, self, *args, **kwargs):
    from sglang.srt.runtime_context import get_exec

    if not (get_exec().deterministic.enable_deterministic_inference and spark_enabled()):
        return original(self, *args, **kwargs)
    if str(self.device).startswith("cuda"):
        return original(self, *args, **kwargs)  # SGLang's batch-invariant ops
    if os.environ.get(CPU_MATMUL_ENV, "1") != "0":
        from spark_sglang import cpu_batch_invariant

        cpu_batch_invariant.install()
    return None


def install() -> None:
    if BACKEND_NAME not in DETERMINISTIC_ATTENTION_BACKEND_CHOICES:
        add_deterministic_attention_backend_choices([BACKEND_NAME])
    if BACKEND_NAME not in RADIX_SUPPORTED_DETERMINISTIC_ATTENTION_BACKEND:
        add_radix_supported_deterministic_attention_backend_choices([BACKEND_NAME])
    HookRegistry.register(TARGET, _maybe_enable_batch_invariant_mode, HookType.AROUND)
