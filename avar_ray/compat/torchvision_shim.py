"""Make ``import torchvision`` work on the CPU build of torch.

The registry's torchvision 0.28.0 wheel is linked against CUDA torch: its ``_C.so`` cannot
load with torch 2.13.0+cpu, and then ``import torchvision`` dies with "operator
torchvision::nms does not exist" while registering fake kernels. vLLM's Qwen2-VL processor
imports ``torchvision.transforms.v2`` at module level, so every vLLM process needs it.

Fix (verified): define the schemas of ``torchvision::nms`` and ``torchvision::qnms`` before
torchvision is imported. The pure-Python transforms (resize, normalise: all Qwen's image
processing uses) then work; the C ops (nms, roi_align, image decoding) do not.

It has to run in every interpreter of the venv (vLLM engine subprocesses, Ray workers), so
``--install`` writes a ``.pth`` start-up hook into site-packages. The hook installs a lazy
meta-path finder: nothing happens at start-up; on the first ``import torchvision`` only it
imports torch and, if ``torch.version.cuda is None``, defines the two schemas. On CUDA torch
it does nothing.
"""
from __future__ import annotations

import importlib.abc
import sys
import sysconfig
from pathlib import Path

HOOK_MODULE = "avar_torchvision_shim"
PTH_NAME = "avar_torchvision_shim.pth"

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_LIBRARY = None  # keeps the torch.library.Library alive (dropping it unregisters the defs)


def define_torchvision_schemas() -> bool:
    """Define the op schemas torchvision's Python side expects. Returns True if it did."""
    global _LIBRARY
    import torch

    if torch.version.cuda is not None or _LIBRARY is not None:
        return False
    try:
        torch._C._dispatch_find_schema_or_throw("torchvision::nms", "")
        return False  # a working torchvision build already defined it
    except RuntimeError:
        pass
    lib = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        lib.define(schema)
    _LIBRARY = lib
    return True


class _TorchvisionFinder(importlib.abc.MetaPathFinder):
    """Runs the schema fix once, on the first ``import torchvision``, then steps aside."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "torchvision":
            return None
        sys.meta_path[:] = [f for f in sys.meta_path if f is not self]
        try:
            define_torchvision_schemas()
        except Exception as exc:  # never break the import system over this
            print(f"[avar] torchvision shim skipped: {exc}", file=sys.stderr)
        return None  # let the normal finders load torchvision


def install_finder() -> None:
    if "torchvision" in sys.modules:
        return
    if not any(isinstance(f, _TorchvisionFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionFinder())


_HOOK_SOURCE = '''"""Written by `python -m avar_ray.compat.torchvision_shim --install`; see that module."""
try:
    from avar_ray.compat.torchvision_shim import install_finder as _install
    _install()
except Exception:  # avar_ray not importable (uninstalled): do nothing
    pass
'''


def install(site_dir: str | None = None) -> Path:
    """Write the start-up hook into ``site_dir`` (default: this interpreter's purelib)."""
    target = Path(site_dir or sysconfig.get_paths()["purelib"])
    (target / f"{HOOK_MODULE}.py").write_text(_HOOK_SOURCE)
    (target / PTH_NAME).write_text(f"import {HOOK_MODULE}\n")
    return target / PTH_NAME


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--install", action="store_true", help="write the .pth start-up hook")
    parser.add_argument("--site-dir", default=None)
    args = parser.parse_args(argv)
    if args.install:
        print(f"installed torchvision start-up hook: {install(args.site_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
