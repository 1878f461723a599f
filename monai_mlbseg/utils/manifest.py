"""What a run was trained on: the content of its data files, so that changed data never mix with old results."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .errors import InputError, Problem
from .io import atomic_write_json, file_digest, run_fingerprint

__all__ = ["DataManifest", "MANIFEST_FILE", "DIGEST_CACHE_FILE"]

logger = logging.getLogger(__name__)

#: the manifest a run records in its folder
MANIFEST_FILE = "data_manifest.json"

#: the cache of file digests, by size and modification time, in the output folder
DIGEST_CACHE_FILE = ".data_digests.json"


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class DataManifest:
    """
    The content of a run's data files: for every file an item names (``image``, ``label``), its name relative to
    the data folder, size, modification time and SHA-256. Its :py:attr:`key` depends on the names and the content
    only, not on where the project lies: the bundle keys its work folder with it, so a rerun on the same data
    resumes (also after the project folder was moved or copied), and changed data (a replaced volume, a label
    corrected in place) start a new run instead of mixing with the old one's results.

    Digests are cached in ``cache_dir/.data_digests.json`` by name, size and modification time (written by
    :py:meth:`record`, once the data check passed, for a run folder inside ``cache_dir``: a driver that places its
    run elsewhere leaves ``cache_dir`` untouched), so a rerun reads a file again only when one of them changed.
    A file that cannot be read is recorded with its problem (and no digest): the data check reports it by name
    right after, and nothing is written.

    Args:
        splits: the run's data lists by split, e.g. ``{"labeled": [...], "unlabeled": [...]}``.
        root: the data folder; names under it are recorded relative to it, others as they are.
        cache_dir: where the digest cache lives (the bundle's output folder); ``None``: no cache.
        keys: the item keys that name data files.
        progress: show a progress bar while files are read.

    Example::

        manifest = DataManifest({"labeled": labeled, "unlabeled": unlabeled}, root="data/LA", cache_dir="work")
        run_dir = os.path.join("work", run_fingerprint(manifest.key, settings))
        manifest.record(run_dir)
    """

    def __init__(
        self,
        splits: Mapping[str, Sequence[Mapping[str, Any]]],
        root: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
        keys: Sequence[str] = ("image", "label"),
        progress: bool = False,
    ) -> None:
        self.root = Path(root).resolve() if root is not None else None
        self.cache_file = Path(cache_dir) / DIGEST_CACHE_FILE if cache_dir is not None else None
        self.paths: dict[str, Path] = {}
        self.splits: dict[str, list[dict[str, str]]] = {}
        for split, items in splits.items():
            entries = []
            for item in items:
                entry = {}
                for key in keys:
                    if isinstance(item.get(key), (str, os.PathLike)):
                        name = self._name(item[key])
                        self.paths[name] = Path(item[key])
                        entry[key] = name
                entries.append(entry)
            self.splits[split] = entries
        self._cache = self._read_cache()
        self.files: dict[str, dict[str, Any]] = {}
        names = sorted(self.paths)
        for name in tqdm(names, desc="data digests", disable=not progress or len(names) < 20):
            self.files[name] = self._record(name, self._cache.get(name))

    def _name(self, path: str | os.PathLike) -> str:
        resolved = Path(path).resolve()
        if self.root is not None and resolved.is_relative_to(self.root):
            return resolved.relative_to(self.root).as_posix()
        return str(resolved)

    def _stat(self, name: str) -> dict[str, Any]:
        stat = self.paths[name].stat()
        return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}

    def _record(self, name: str, cached: Mapping[str, Any] | None) -> dict[str, Any]:
        try:
            record = self._stat(name)
            if cached and cached.get("sha256") and all(cached.get(k) == v for k, v in record.items()):
                return {**record, "sha256": cached["sha256"]}
            return {**record, "sha256": file_digest(self.paths[name])}
        except OSError as e:
            return {"problem": e.strerror or str(e)}

    def _read_cache(self) -> dict[str, Any]:
        if self.cache_file is None or not self.cache_file.is_file():
            return {}
        try:
            cache = json.loads(self.cache_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return cache if isinstance(cache, dict) else {}

    def _write_cache(self) -> None:
        cache = self._cache
        fresh = {name: record for name, record in self.files.items() if "sha256" in record}
        if self.cache_file is None or _rank() > 0 or all(cache.get(n) == r for n, r in fresh.items()):
            return
        try:
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.cache_file, {**cache, **fresh})
            self._cache = {**cache, **fresh}
        except OSError as e:
            logger.warning(f"cannot write the digest cache {self.cache_file} ({e.strerror or e}): files are read again")

    @property
    def content(self) -> dict[str, Any]:
        """The data lists by split with each file's name and digest: what the run was trained on."""
        return {
            split: [{key: [name, self.files[name].get("sha256")] for key, name in entry.items()} for entry in entries]
            for split, entries in self.splits.items()
        }

    @property
    def key(self) -> str:
        """A fingerprint of the names (relative to the data folder) and the content of every file."""
        return run_fingerprint(self.content)

    @property
    def layout(self) -> str:
        """A fingerprint of the names only: runs on the same files, whatever their content, share it."""
        return run_fingerprint(self.splits)

    def digest_of(self, path: str | os.PathLike) -> str | None:
        """The recorded SHA-256 of the data file ``path`` (``None`` when the manifest does not hold it)."""
        return self.files.get(self._name(path), {}).get("sha256")

    def changed(self) -> dict[str, str]:
        """
        The files that changed since the manifest was made, each with what changed (``"content"``, ``"removed"``,
        ``"unreadable"``): a file whose size and modification time are as recorded is taken as unchanged, any
        other is read again and compared by digest (a file touched or copied, same content, is unchanged).

        Returns:
            name -> what changed; empty when nothing did.
        """
        out = {}
        for name, recorded in self.files.items():
            if "sha256" not in recorded:
                continue
            try:
                now = self._stat(name)
                if all(recorded[k] == v for k, v in now.items()):
                    continue
                if file_digest(self.paths[name]) != recorded["sha256"]:
                    out[name] = "content"
                else:
                    recorded.update(now)
            except FileNotFoundError:
                out[name] = "removed"
            except OSError as e:
                out[name] = f"unreadable ({e.strerror or e})"
        return out

    def verify(self, what: str = "this run") -> None:
        """
        Refuse to go on when a data file changed since the manifest was made (see :py:meth:`changed`).

        Args:
            what: what would use the changed data, for the message.

        Raises:
            InputError: naming every changed file; nothing of the changed data has been used.
        """
        changed = self.changed()
        if changed:
            problems = [
                Problem(str(self.paths[name]), f"changed while {what} was using it ({how})")
                for name, how in changed.items()
            ]
            raise InputError(
                problems,
                "data changed during the run; it stops without using them. Run the same command again: the changed "
                "data start a new run (docs/reliability.md says how to reuse the finished stage 1)",
            )

    def record(self, run_dir: str | os.PathLike, output_dir: str | os.PathLike | None = None) -> Path:
        """
        Write the manifest to ``run_dir/data_manifest.json`` when the run is new, and the digest cache. A new run
        whose files are named like those of an earlier run under ``output_dir`` but whose content differs says so:
        which files changed, and how to reuse that run's stage 1.

        Args:
            run_dir: the run's folder (keyed with :py:attr:`key`).
            output_dir: the folder of earlier runs (default: ``run_dir``'s parent).

        Returns:
            the manifest file.
        """
        run_dir = Path(run_dir)
        target = run_dir / MANIFEST_FILE
        if self.cache_file is not None and run_dir.resolve().parent == self.cache_file.parent.resolve():
            self._write_cache()
        if target.is_file() or _rank() > 0:
            return target
        earlier = self._earlier_run(Path(output_dir) if output_dir is not None else run_dir.parent, run_dir)
        if earlier is not None:
            folder, differ = earlier
            shown = ", ".join(differ[:5]) + (f" and {len(differ) - 5} more" if len(differ) > 5 else "")
            logger.warning(
                f"the data changed since the run in {folder} ({len(differ)} file(s): {shown}): this is a new run in "
                f"{run_dir}, trained from the start. To keep that run's stage 1 (for instance after correcting "
                f"labels), add --stage1_dir {folder}"
            )
        run_dir.mkdir(parents=True, exist_ok=True)
        manifest = {"key": self.key, "layout": self.layout, "root": str(self.root), "files": self.files}
        return atomic_write_json(target, {**manifest, "splits": self.splits})

    def _earlier_run(self, output_dir: Path, run_dir: Path) -> tuple[Path, list[str]] | None:
        """The newest run under ``output_dir`` on the same names with other content, with the names that differ."""
        found = []
        for path in output_dir.glob(f"*/{MANIFEST_FILE}"):
            if path.parent.resolve() == run_dir.resolve():
                continue
            try:
                other = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(other, dict) and other.get("layout") == self.layout:
                found.append((path.stat().st_mtime, path.parent, other.get("files", {})))
        if not found:
            return None
        _, folder, files = max(found, key=lambda f: f[0])
        differ = [n for n, r in self.files.items() if r.get("sha256") != files.get(n, {}).get("sha256")]
        return folder, differ
