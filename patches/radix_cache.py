"""Seam: a running request keeps reading the KV it was served with.

After a prefill SGLang checkpoints the running request into the radix tree; where the tree already
holds part of its prompt, the request's own slots for that part are freed and its row is pointed
at the tree's copy, while it is still decoding. With a dense cache both copies are equal. With
SparK they were compressed under different windows, so the rest of the request would read another
request's compression of its prompt, and its answer would depend on concurrent traffic. Under the
``spark`` backend a request is therefore inserted into the tree only when it finishes (its final
insert deduplicates as usual); until then it keeps its own slots, as SGLang itself does when it
declines an insert. Later requests can share its prompt once it has finished.
"""

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from spark_sglang.patches.kv_pool import spark_enabled

#: Radix trees of SGLang 0.5.23 whose ``checkpoint(req, up_to=...)`` publishes a request.
TREES = (
    "sglang.srt.mem_cache.unified_radix_cache.UnifiedRadixCache.checkpoint",
    "sglang.srt.mem_cache.radix_cache.RadixCache.checkpoint",
)


def _checkpoint(original, self, req, *args, **kwargs):
    if spark_enabled() and not req.finished():
        return None
    return original(self, req, *args, **kwargs)


def install() -> None:
    for target in TREES:
        HookRegistry.register(target, _checkpoint, HookType.AROUND)
