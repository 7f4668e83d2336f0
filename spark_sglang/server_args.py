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
    "spark_reproducible": "reproducible",
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
    spark_reproducible: A[Optional[bool], Arg(help=(
        "SparK: a request's last prompt query reads its own prompt compressed, as the cache stores it, so a "
        "resent prompt or a parallel sample that hits the radix cache reproduces the cold run exactly "
        "(default off: that query reads its own prompt dense, which gives better first tokens)."))] = None


def given_options(server_args) -> dict:
    """The ``spark_*`` options that were set explicitly."""
    return {o: getattr(server_args, o, None) for o in OPTION_FIELDS if getattr(server_args, o, None) is not None}


def option_errors(server_args) -> list[str]:
    """One message per bad ``spark_*`` value, each naming its flag and keyword."""
    errors = []
    for option, value in given_options(server_args).items():
        try:
            SparKConfig(**{OPTION_FIELDS[option]: value})
        except ValueError as error:
            errors.append(f"{error} (given as --{option.replace('_', '-')} / {option}=)")
    return errors


def deterministic(server_args) -> bool:
    """``--enable-deterministic-inference`` as resolved (SGLang also turns it on for
    ``--rl-on-policy-target``, a declaration rather than a field write)."""
    from sglang.srt.arg_groups.overrides import resolution_result

    return bool(resolution_result(server_args, "enable_deterministic_inference", False))


def spark_config(server_args) -> SparKConfig:
    """Validated config from the server arguments; every bad value is listed, with its flag.

    Deterministic mode turns ``reproducible`` on: a radix hit on a resent prompt must give the
    cold run's answer (a contradicting ``--spark-reproducible false`` is refused at start-up)."""
    errors = option_errors(server_args)
    if errors:
        raise ValueError("\n".join(errors))
    fields = {OPTION_FIELDS[o]: v for o, v in given_options(server_args).items()}
    if deterministic(server_args):
        fields["reproducible"] = True
    return SparKConfig(**fields)
