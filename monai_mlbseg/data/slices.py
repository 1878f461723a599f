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

    Each volume is loaded with ``load`` (e.g. ``LoadImaged`` + ``EnsureChannelFirstd`` + label binarisation:
    ``{key: [C, X, Y, Z]}``), cut into slices along ``axis``, and every slice goes through the deterministic
    ``slice_transform`` (e.g. per-slice min-max and resizing to 144x144, MONAI dictionary transforms on
    ``{key: [C, X, Y]}``); the results are cached in memory (labels as ``uint8``). ``transform`` (random
    augmentation) runs on every ``__getitem__``. Items carry ``case_id`` and ``slice_index``.

    Nothing is read at construction. The first ``len()`` or item fills the cache (in the main process, before
    DataLoader workers fork and share it). While a label file an item names does not exist yet (e.g. the initial
    labels a previous step writes), ``len()`` only reads the images to count the slices and the cache is filled at
    the first item; so a trainer can be built, and a bundle's properties checked, before that step has run.

    The cache is bounded: when it would exceed ``max_cache_fraction`` of the memory available at construction
    (or ``max_cache_bytes``), a warning is logged and the dataset falls back to loading volumes on demand (the last
    loaded volume is kept), which is slower but correct.

    Args:
        data: volume items (dicts with the keys and ``case_id``).
        load: volume loader; it must accept items without the label keys (e.g. ``allow_missing_keys=True``).
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
        self.cache_limit = (
            max_cache_bytes if max_cache_bytes is not None else int(max_cache_fraction * available_memory())
        )
        self.cached = cache
        self.progress = progress
        self._cache: list[dict[str, torch.Tensor]] = []
        self._cache_bytes = 0
        self._cache_ready = False
        self._index: list[tuple[int, int]] | None = None
        self._last: tuple[int, list[dict]] | None = None

    @property
    def cache_bytes(self) -> int:
        """Bytes held by the slice cache (0 when loading on demand)."""
        return self._cache_bytes

    def _where(self, item: dict) -> str:
        return str(item.get("case_id", item.get(self.keys[0], item)))

    def _arrays(self, item: dict, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """Load ``keys`` of a volume item as channel-first 3D tensors of one shape."""
        volume = self.load({k: v for k, v in item.items() if k in keys or k not in self.keys})
        present = [k for k in keys if k in volume]
        if not present:
            raise KeyError(f"case {self._where(item)}: none of the keys {tuple(keys)} was loaded.")
        arrays = {k: _plain(volume[k]) for k in present}
        ref = arrays[present[0]]
        if ref.ndim != 4:
            raise ValueError(
                f"case {self._where(item)}: expected a channel-first 3D volume [C, X, Y, Z], got shape "
                f"{tuple(ref.shape)}."
            )
        for k, a in arrays.items():
            if a.shape[1:] != ref.shape[1:]:
                raise ValueError(
                    f"case {self._where(item)}: '{k}' has shape {tuple(a.shape)} but '{present[0]}' has "
                    f"{tuple(ref.shape)}."
                )
        return arrays

    def _slice_volume(self, item: dict) -> list[dict]:
        arrays = self._arrays(item, self.keys)
        axis = self.axis % 3 + 1
        slices = []
        for z in range(next(iter(arrays.values())).shape[axis]):
            sample = {k: a.select(axis, z) for k, a in arrays.items()}
            if self.slice_transform is not None:
                sample = self.slice_transform(sample)
            slices.append({k: _plain(sample[k]) for k in arrays})
        return slices

    def _files_present(self) -> bool:
        """Whether every file an item names under the keys exists (in-memory values count as present)."""
        return all(
            not isinstance(item[k], str) or os.path.exists(item[k])
            for item in self.data
            for k in self.keys
            if k in item
        )

    def _ensure_index(self) -> list[tuple[int, int]]:
        if self._index is None:
            if self.cached and self._files_present():
                self._fill_cache()
            else:
                index: list[tuple[int, int]] = []
                axis = self.axis % 3 + 1
                for v, item in enumerate(tqdm(self.data, desc="indexing volumes", disable=not self.progress)):
                    image = next(iter(self._arrays(item, self.keys[:1]).values()))
                    index.extend((v, z) for z in range(image.shape[axis]))
                self._index = index
        return self._index

    def _fill_cache(self) -> None:
        index: list[tuple[int, int]] = []
        for v, item in enumerate(tqdm(self.data, desc="caching slices", disable=not self.progress)):
            slices = self._slice_volume(item)
            index.extend((v, z) for z in range(len(slices)))
            if self.cached:
                self._store(slices)
        if self._index is not None and index != self._index:
            raise ValueError("SliceDataset: the volumes changed between indexing and caching.")
        self._index = index
        self._cache_ready = True
        if self.cached:
            logger.info(f"cached {len(index)} slices of {len(self.data)} volumes ({self._cache_bytes / 2**20:.0f} MiB)")

    def _ensure_cache(self) -> None:
        if self._cache_ready:
            return
        if self.cached:
            self._fill_cache()
        else:
            self._ensure_index()
            self._cache_ready = True

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
        return len(self._ensure_index())

    def _slice(self, v: int, z: int) -> dict:
        if self.cached:
            return {k: t[z].float() for k, t in self._cache[v].items()}
        if self._last is None or self._last[0] != v:
            self._last = (v, self._slice_volume(self.data[v]))
        return {k: t.float() for k, t in self._last[1][z].items()}

    def __getitem__(self, index: int) -> dict:
        self._ensure_cache()
        v, z = self._ensure_index()[index]
        sample = self._slice(v, z)
        sample["case_id"] = str(self.data[v].get("case_id", v))
        sample["slice_index"] = z
        if self.transform is not None:
            sample = self.transform(sample)
        return sample
