"""Lets SGLang import and run on a CPU-only torch. Development and CI machines only.

The CPU setup path (scripts/setup_env.sh) writes a ``.pth`` file into the virtual environment that
imports this module at every interpreter start, so SGLang's spawned scheduler processes get it too.
It imports nothing heavy at start-up; it only installs an import hook that fixes two imports:

* ``torchvision``: the PyPI wheel is a CUDA build whose ``_C`` cannot load against torch+cpu, and
  its meta registrations then fail on the missing ``torchvision::nms`` schema. The hook defines the
  two op schemas just before torchvision is first imported.
* ``vllm._custom_ops``: SGLang's rotary layer imports ``rotary_embedding`` from it on a plain CPU
  platform but then runs its pure-torch path. When vllm is absent the hook provides a module whose
  function raises if it is ever called, so nothing can silently run a fake kernel.
"""

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

_torchvision_lib = None


def _define_torchvision_schemas() -> None:
    global _torchvision_lib
    import torch

    if torch.cuda.is_available():
        return
    _torchvision_lib = torch.library.Library("torchvision", "DEF")
    _torchvision_lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _torchvision_lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


def _rotary_embedding_unavailable(*args, **kwargs):
    raise RuntimeError(
        "vllm._custom_ops.rotary_embedding is not available on this CPU-only environment; "
        "SGLang should have taken its pure-torch rotary path"
    )


class _StubLoader(importlib.abc.Loader):
    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        if spec.name == "vllm":
            module.__path__ = []  # a package, so that vllm._custom_ops can be imported
        else:
            module.rotary_embedding = _rotary_embedding_unavailable
        return module

    def exec_module(self, module):
        pass


class _CpuImportHook(importlib.abc.MetaPathFinder):
    def __init__(self):
        self._torchvision_done = False
        self._vllm_missing = None

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision" and not self._torchvision_done:
            self._torchvision_done = True
            _define_torchvision_schemas()
            return None
        if name in ("vllm", "vllm._custom_ops"):
            if self._vllm_missing is None:
                self._vllm_missing = not any(
                    f is not self and getattr(f, "find_spec", None) and f.find_spec("vllm", None) is not None
                    for f in sys.meta_path
                )
            if self._vllm_missing:
                return importlib.machinery.ModuleSpec(name, _StubLoader(), is_package=(name == "vllm"))
        return None


if not any(isinstance(f, _CpuImportHook) for f in sys.meta_path):
    sys.meta_path.insert(0, _CpuImportHook())
