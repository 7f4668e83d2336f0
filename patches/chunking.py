"""Seam: a prompt's chunk boundaries depend on the prompt, not on the batch it lands in.

SparK scores each chunk of a chunked prefill with that chunk's own window of queries, so where the
chunks end decides how the prompt is compressed. SGLang fills each prefill batch up to
``--chunked-prefill-size`` tokens and cuts the last admitted prompt at whatever budget is left, so
the same prompt would be cut differently depending on the requests ahead of it (measured in the
soak: bursts of identical prompts with more than one answer). Under the ``spark`` backend a prompt
that would be cut is instead left for a later batch when the batch already holds other requests;
at the head of a batch it gets the full chunk budget, and SGLang continues an unfinished prompt at
the head of the next batch with the full budget again. So a prompt is cut every
``--chunked-prefill-size`` tokens after its cached prefix, whatever else is being served, unless
the pool is too full to give a whole chunk. A batch may hold fewer prompt tokens than it could.
"""

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from spark_sglang.patches.kv_pool import spark_enabled

TARGET = "sglang.srt.managers.schedule_policy.PrefillAdder._select_prefill_admission"


def _select_prefill_admission(original, self, req, *args, **kwargs):
    admission = original(self, req, *args, **kwargs)
    if spark_enabled() and getattr(admission, "is_chunked", False) and self.can_run_list:
        from sglang.srt.managers.schedule_policy import AddReqResult

        return AddReqResult.OTHER  # start this prompt at the head of a later batch
    return admission


def install() -> None:
    HookRegistry.register(TARGET, _select_prefill_admission, HookType.AROUND)
