"""Seam: start-up checks in SGLang's argument resolution (launcher process, before any spawn)."""

from sglang.srt.arg_groups.resolution_hooks import register_resolution_hook

from spark_sglang import refusals


def _check(server_args, previous):
    previous(server_args)
    from sglang.srt.arg_groups.overrides import attention_backends_of, model_config_of, resolving_view

    settings = resolving_view(server_args)
    backends = attention_backends_of(settings)
    model_config = model_config_of(server_args) if "spark" in tuple(backends) else None
    refusals.check(server_args, settings, backends, model_config)


def install() -> None:
    register_resolution_hook("handle_attention_backend_compatibility")(_check)
