"""The demo's options as one object: sizes resolved from a preset, the user's overrides parsed, bundle ids derived."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from monai_mlbseg.utils import InputError, Problem

__all__ = ["QUICK", "SIZES", "DemoConfig"]

#: the demo's sizes, sized for 2 CPU cores (every one is an argument of :py:func:`run_demo`)
SIZES = {
    "num_labeled": 4,
    "num_unlabeled": 16,
    "num_test": 16,
    "volume_shape": (80, 72, 32),
    "image_size": 64,
    "features": (8, 16, 32, 64),
    "stage1_iterations": 1000,
    "stage2_steps": 300,
}
#: the ``quick`` preset: a tiny configuration for smoke tests (an explicit argument still wins)
QUICK = {
    "num_labeled": 2,
    "num_unlabeled": 3,
    "num_test": 2,
    "volume_shape": (40, 36, 8),
    "image_size": 32,
    "features": (4, 8),
    "stage1_iterations": 6,
    "stage2_steps": 6,
}


def parse_overrides(overrides: dict[str, Any] | str | None) -> dict[str, Any]:
    """
    The demo's extra bundle overrides: a dict of ``{"id#path": value}``, or the same as a JSON object (as typed on
    the command line); ``None``: none.
    """
    if overrides is None:
        return {}
    if isinstance(overrides, str):
        try:
            overrides = json.loads(overrides)
        except json.JSONDecodeError as e:
            raise InputError([Problem("overrides", f"not a JSON object: {e}")], "demo options") from None
    if not isinstance(overrides, dict) or not all(isinstance(k, str) for k in overrides):
        raise InputError(
            [Problem("overrides", f"expected an object of bundle ids to values, got {overrides!r}")], "demo options"
        )
    return dict(overrides)


@dataclass
class DemoConfig:
    """
    The options of a demo run, as :py:func:`~monai_mlbseg.demo.demo` documents them; a size left ``None`` takes
    the preset's (:py:data:`QUICK` with ``quick``, else :py:data:`SIZES`), ``overrides`` is parsed into
    :py:attr:`user_overrides`, and a run without ``data_dir`` generates its volumes in ``<out>/data`` in the UA-MT
    layout.

    Raises:
        InputError: when ``overrides`` is not a JSON object of bundle ids.

    Example::

        config = DemoConfig(out="demo", quick=True)
        config.training_overrides(Path("demo/bundle"))["stage2_steps"]  # 6
    """

    out: str = "mlbseg_demo"
    data_dir: str | None = None
    format: str = "uamt_h5"
    anatomy: str = "la_demo"
    num_labeled: int | None = None
    num_unlabeled: int | None = None
    num_test: int | None = None
    volume_shape: Sequence[int] | None = None
    image_size: int | None = None
    features: Sequence[int] | None = None
    stage1_iterations: int | None = None
    stage2_steps: int | None = None
    stage1_batch: int = 4
    lr: float = 0.01
    seed: int = 0
    device: str | None = None
    overrides: dict[str, Any] | str | None = None
    control: bool = True
    quick: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        preset = QUICK if self.quick else SIZES
        for name, value in preset.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        self.features = tuple(int(f) for f in self.features)  # type: ignore[union-attr]
        self.volume_shape = tuple(int(s) for s in self.volume_shape)  # type: ignore[union-attr]
        #: the user's own bundle overrides (any id), applied last
        self.user_overrides = parse_overrides(self.overrides)
        #: the output folder
        self.out_dir = Path(self.out).resolve()
        #: whether the scans are the user's (``data_dir``) or generated
        self.user_data = self.data_dir is not None
        #: the folder of the scans
        self.data_path = Path(self.data_dir).resolve() if self.data_dir is not None else self.out_dir / "data"
        if not self.user_data:
            self.format = "uamt_h5"
        #: the training device
        self.torch_device = torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    @classmethod
    def options(cls) -> tuple[str, ...]:
        """The names of the options."""
        return tuple(f.name for f in fields(cls))

    def data_overrides(self, bundle: Path) -> dict[str, Any]:
        """The top-level bundle ids every workflow of the demo shares: bundle, data, sizes, device."""
        return {
            "bundle_root": str(bundle),
            "dataset_dir": str(self.data_path),
            "data_format": self.format,
            "datalist_file": str(self.out_dir / "datalist.json"),
            "image_size": [self.image_size, self.image_size],
            "features": list(self.features),  # type: ignore[arg-type]
            "device": str(self.torch_device),
        }

    def training_overrides(self, bundle: Path) -> dict[str, Any]:
        """
        The top-level bundle ids of the demo's training: stage-1 weights and initial labels under ``out``, the final
        weights in ``<out>/models``, the lengths and the learning rate.
        """
        return {
            **self.data_overrides(bundle),
            "lr": self.lr,
            "run_dir": str(self.out_dir),
            "ckpt_dir": str(self.out_dir / "models"),
            "stage1_batch_size": self.stage1_batch,
            "stage1_iterations": self.stage1_iterations,
            "stage2_steps": self.stage2_steps,
            "progress": self.progress,
        }

    def user_overrides_text(self) -> str:
        """The user's overrides as the report shows them."""
        return json.dumps(self.user_overrides) if self.user_overrides else "none"
