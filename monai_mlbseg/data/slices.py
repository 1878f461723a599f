"""2D training slices of 3D volumes, cached in memory within a bound."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.data import MetaTensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

__all__ = ["SliceDataset", "available_memory"]

logger = logging.getLogger(__name__)


def available_memory() -> int:
    """Bytes of memory available to new allocations (``MemAvailable`` on Linux, else free physical pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _plain(x: Any) -> torch.Tensor:
    return x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)


class SliceDataset(Dataset):
    """
    Every slice of a list of 3D volumes as a 2D training sample.

    Each volume is loaded once with ``load`` (e.g. ``LoadImaged`` + ``EnsureChannelFirstd`` + label binarisation:
    ``{key: [C, X, Y, Z]}``), cut into slices along ``axis``, and every slice goes through the deterministic
    ``slice_transform`` (e.g. per-slice min-max and resizing to 144x144, MONAI dictionary transforms on
    ``{key: [C, X, Y]}``); the results are cached in memory (labels as ``uint8``). ``transform`` (random
    augmentation) runs on every ``__getitem__``. Items carry ``case_id`` and ``slice_index``.

    The cache is bounded: when it would exceed ``max_cache_fraction`` of the memory available at construction
    (or ``max_cache_bytes``), a warning is logged and the dataset falls back to loading volumes on demand (the last
    loaded volume is kept), which is slower but correct.

    Args:
        data: volume items (dicts with the keys and ``case_id``).
        load: volume loader.
        slice_transform: deterministic per-slice transform (cached).
        transform: random per-item transform (not cached).
        keys: the image/label keys to slice; keys missing from an item are skipped.
        axis: spatial axis of the slices (default: last).
        label_keys: keys stored compactly as ``uint8`` (binary masks).
        cache: cache the slices (``False``: always load on demand).
        max_cache_fraction: bound of the cache as a fraction of the available memory.
        max_cache_bytes: explicit bound in bytes (overrides the fraction).
        progress: progress bar while loading.

    Example::

        ds = SliceDataset(items, load=volume_transforms,
                          slice_transform=Compose([ScaleIntensityd("image"), Resized(["image", "label"], (144, 144),
                                                    mode=("bilinear", "nearest"))]),
                          transform=RandFlipd(["image", "label"], prob=0.5, spatial_axis=1))
    """

    def __init__(
        self,
        data: Sequence[dict],
        load: Callable[[dict], dict],
        slice_transform: Callable[[dict], dict] | None = None,
        transform: Callable[[dict], dict] | None = None,
        keys: Sequence[str] = ("image", "label", "gt"),
        axis: int = -1,
        label_keys: Sequence[str] = ("label", "gt"),
        cache: bool = True,
        max_cache_fraction: float = 0.5,
        max_cache_bytes: int | None = None,
        progress: bool = True,
    ) -> None:
        self.data = list(data)
        self.load = load
        self.slice_transform = slice_transform
        self.transform = transform
        self.keys = tuple(keys)
        self.axis = axis
        self.label_keys = set(label_keys)
        limit = max_cache_bytes if max_cache_bytes is not None else int(max_cache_fraction * available_memory())
        self.cache_limit = limit
        self.cached = cache
        self._cache: list[dict[str, torch.Tensor]] = []
        self._cache_bytes = 0
        self._index: list[tuple[int, int]] = []
        self._last: tuple[int, list[dict]] | None = None
        for v, item in enumerate(tqdm(self.data, desc="loading volumes", disable=not progress)):
            slices = self._slice_volume(item)
            self._index.extend((v, z) for z in range(len(slices)))
            if self.cached:
                self._store(slices)
        if self.cached:
            logger.info(
                f"cached {len(self._index)} slices of {len(self.data)} volumes ({self._cache_bytes / 2**20:.0f} MiB)"
            )

    @property
    def cache_bytes(self) -> int:
        """Bytes held by the slice cache (0 when loading on demand)."""
        return self._cache_bytes

    def _slice_volume(self, item: dict) -> list[dict]:
        volume = self.load(dict(item))
        keys = [k for k in self.keys if k in volume]
        if not keys:
            raise KeyError(f"case {item.get('case_id', item)}: none of the keys {self.keys} was loaded.")
        arrays = {k: _plain(volume[k]) for k in keys}
        ref = arrays[keys[0]]
        if ref.ndim != 4:
            raise ValueError(
                f"case {item.get('case_id', item)}: expected a channel-first 3D volume [C, X, Y, Z], "
                f"got shape {tuple(ref.shape)}."
            )
        axis = self.axis % 3 + 1
        depth = ref.shape[axis]
        for k, a in arrays.items():
            if a.shape[1:] != ref.shape[1:]:
                raise ValueError(
                    f"case {item.get('case_id', item)}: '{k}' has shape {tuple(a.shape)} but '{keys[0]}' has "
                    f"{tuple(ref.shape)}."
                )
        slices = []
        for z in range(depth):
            sample = {k: a.select(axis, z) for k, a in arrays.items()}
            if self.slice_transform is not None:
                sample = self.slice_transform(sample)
            slices.append({k: _plain(sample[k]) for k in keys})
        return slices

    def _store(self, slices: list[dict]) -> None:
        stacked = {}
        for k in slices[0]:
            t = torch.stack([s[k] for s in slices])
            stacked[k] = t.to(torch.uint8) if k in self.label_keys else t.float()
        size = sum(t.numel() * t.element_size() for t in stacked.values())
        if self._cache_bytes + size > self.cache_limit:
            logger.warning(
                f"SliceDataset: the slice cache would exceed {self.cache_limit / 2**20:.0f} MiB; "
                "falling back to loading volumes on demand (slower)."
            )
            self.cached = False
            self._cache.clear()
            self._cache_bytes = 0
            return
        self._cache.append(stacked)
        self._cache_bytes += size

    def __len__(self) -> int:
        return len(self._index)

    def _slice(self, v: int, z: int) -> dict:
        if self.cached:
            return {k: t[z].float() for k, t in self._cache[v].items()}
        if self._last is None or self._last[0] != v:
            self._last = (v, self._slice_volume(self.data[v]))
        return {k: t.float() for k, t in self._last[1][z].items()}

    def __getitem__(self, index: int) -> dict:
        v, z = self._index[index]
        sample = self._slice(v, z)
        sample["case_id"] = self.data[v].get("case_id", str(v))
        sample["slice_index"] = z
        if self.transform is not None:
            sample = self.transform(sample)
        return sample
