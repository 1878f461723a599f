"""Import MONAI Label's inference task where no working ``torchvision`` is installed."""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__all__ = ["import_without_torchvision"]


def _torchvision_works() -> bool:
    try:
        import torchvision.utils  # noqa: F401
    except Exception:  # a missing package, or one built for another torch ("operator torchvision::nms ...")
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        return False
    return True


def import_without_torchvision(module: str, name: str) -> Any:
    """
    ``getattr(import_module(module), name)`` for a MONAI Label module that imports ``torchvision`` only for a debug
    transform (``monailabel.transform.post`` draws image grids with ``torchvision.utils``): where ``torchvision`` is
    missing or does not match the installed torch (no CPU wheel matches every torch build), a stand-in module is
    registered for the duration of the import and removed after it. The debug transform is not used by this
    package's tasks.

    Args:
        module: the module to import, e.g. ``"monailabel.tasks.infer.bundle"``.
        name: the attribute to return, e.g. ``"BundleInferTask"``.

    Returns:
        the attribute.

    Example::

        BundleInferTask = import_without_torchvision("monailabel.tasks.infer.bundle", "BundleInferTask")
    """
    if _torchvision_works():
        return getattr(importlib.import_module(module), name)
    stand_in, utils = types.ModuleType("torchvision"), types.ModuleType("torchvision.utils")
    utils.make_grid = utils.save_image = None  # type: ignore[attr-defined]
    stand_in.utils = utils  # type: ignore[attr-defined]
    sys.modules.update({"torchvision": stand_in, "torchvision.utils": utils})
    try:
        return getattr(importlib.import_module(module), name)
    finally:
        sys.modules.pop("torchvision", None)
        sys.modules.pop("torchvision.utils", None)
