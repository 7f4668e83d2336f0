"""SparK's server options as real fields of SGLang's server arguments.

``SparkServerArgs`` is SGLang's ``ServerArgs`` record plus the ``spark_*`` fields. It is used by the
launcher's argparse and by ``sglang.Engine(**kwargs)`` (see ``spark_sglang.patches.server_args``),
and it is pickled by reference into every scheduler process, so the pool and the attention backend
read the same options there (and ``/get_server_info`` reports them).
"""

from __future__ import annotations

from typing import Optional

from sglang.srt.arg_groups.arg_utils import A, Arg
from sglang.srt.server_args import ServerArgs

from spark_sglang.kernels.layout import RECOVERY_MODES, SparKConfig

BACKEND_NAME = "spark"
_DEFAULTS = SparKConfig()

#: Engine keyword -> SparKConfig field. A None value means "not given": the default applies.
OPTION_FIELDS = {
    "spark_key_ratio": "key_ratio",
    "spark_value_ratio": "value_ratio",
    "spark_window": "window",
    "spark_recovery": "recovery",
    "spark_dense_layers": "dense_layers",
}


class SparkServerArgs(ServerArgs, kw_only=True):
    """SGLang's server arguments plus SparK's (module level: pickled by reference)."""

    spark_key_ratio: A[Optional[float], Arg(help=(
        "SparK: fraction of key channels pruned per token and KV head, in [0, 1) "
        f"(default {_DEFAULTS.key_ratio}). Needs --attention-backend spark."))] = None
    spark_value_ratio: A[Optional[float], Arg(help=(
        "SparK: fraction of value channels pruned per token and KV head, in [0, 1); "
        f"0 keeps values dense (default {_DEFAULTS.value_ratio})."))] = None
    spark_window: A[Optional[int], Arg(help=(
        f"SparK: number of last prompt queries that score key channels (default {_DEFAULTS.window})."))] = None
    spark_recovery: A[Optional[str], Arg(choices=list(RECOVERY_MODES), help=(
        f"SparK: how pruned key channels are recovered (default {_DEFAULTS.recovery!r}: "
        "the per-token mean saliency with the key's sign; 'zero': zero fill)."))] = None
    spark_dense_layers: A[Optional[str], Arg(help=(
        "SparK: comma-separated layer indices whose KV cache stays dense (default: none)."))] = None


def given_options(server_args) -> dict:
    """The ``spark_*`` options that were set explicitly."""
    return {o: getattr(server_args, o, None) for o in OPTION_FIELDS if getattr(server_args, o, None) is not None}


def spark_config(server_args) -> SparKConfig:
    """Validated config from the server arguments; a bad value names its flag and keyword."""
    given = given_options(server_args)
    try:
        return SparKConfig(**{OPTION_FIELDS[o]: v for o, v in given.items()})
    except ValueError as error:
        names = ", ".join(f"--{o.replace('_', '-')} / {o}=" for o in given)
        raise ValueError(f"{error} (given as {names})") from None
