"""Seam: SparK's options on SGLang's command line and in ``sglang.Engine(**kwargs)``."""

import sys

from sglang.srt.arg_groups.arg_utils import add_cli_args_from_dataclass
from sglang.srt.plugins.hook_registry import HookRegistry, HookType
from sglang.srt.server_args import ServerArgs

from spark_sglang.server_args import OPTION_FIELDS, SparkServerArgs


def _add_cli_args(result, parser):
    add_cli_args_from_dataclass(parser, SparkServerArgs, fields=list(OPTION_FIELDS))


def _from_cli_args(original, cls, args):
    return original(SparkServerArgs if cls is ServerArgs else cls, args)


def install() -> None:
    HookRegistry.register("sglang.srt.server_args.ServerArgs.add_cli_args", _add_cli_args, HookType.AFTER)
    HookRegistry.register("sglang.srt.server_args.ServerArgs.from_cli_args", _from_cli_args, HookType.AROUND)
    # Engine.__init__ loads plugins, then builds `self.server_args_class(**kwargs)`.
    engine = sys.modules.get("sglang.srt.entrypoints.engine")
    if engine is not None and engine.Engine.server_args_class is ServerArgs:
        engine.Engine.server_args_class = SparkServerArgs
