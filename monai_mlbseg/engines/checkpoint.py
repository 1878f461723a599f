"""Crash-safe checkpoints: atomic saving, resuming from the latest checkpoint, and checked model loading."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from monai.handlers import CheckpointSaver
from torch import nn

from monai_mlbseg.utils import (
    InputError,
    Problem,
    atomic_torch_save,
    atomic_write_json,
    digest_path,
    digest_problem,
    unwrap_network,
    write_digest,
)
from monai_mlbseg.utils.io import TEMP_MARKER, writing

__all__ = [
    "AtomicCheckpointSaver",
    "ResumeFromCheckpoint",
    "checkpoints",
    "latest_checkpoint",
    "load_weights",
    "save_weights",
    "state_problem",
]

_FRESH_START = "; use another output folder, or move or delete this one to train from the start"

_STEP = re.compile(r"(?:^|_)(?:final_)?iteration=(\d+)\.pt$")


class _SafeDiskSaver(DiskSaver):
    """
    Ignite's atomic ``DiskSaver`` that records each checkpoint's digest once it is in place and removes the
    checkpoints it replaces only after the new one is complete (Ignite removes the oldest before it saves: a kill in
    between would leave none).
    """

    def __init__(self, saver: DiskSaver) -> None:
        super().__init__(
            saver.dirname, atomic=True, require_empty=False, save_on_rank=saver.save_on_rank, **saver.kwargs
        )
        self._pending: list[str] = []

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        digest_path(self.dirname / filename).unlink(missing_ok=True)
        with writing(self.dirname / filename):
            super().__call__(checkpoint, filename, metadata)
        write_digest(self.dirname / filename)
        pending, self._pending = self._pending, []
        for name in pending:
            if name != filename:
                super().remove(name)
                digest_path(self.dirname / name).unlink(missing_ok=True)

    def remove(self, filename: str) -> None:
        self._pending.append(filename)


def _remove_leftovers(folder: Path) -> list[Path]:
    """Delete the temporary files a killed save left in a checkpoint folder (Ignite's ``tmp*``, ours
    ``*.partial-*``); returns them."""
    if not folder.is_dir():
        return []
    found = [
        p
        for p in folder.iterdir()
        if p.is_file() and (TEMP_MARKER in p.name or (p.name.startswith("tmp") and "." not in p.name))
    ]
    for path in found:
        path.unlink(missing_ok=True)
    return found


class AtomicCheckpointSaver(CheckpointSaver):
    """
    MONAI's :py:class:`~monai.handlers.CheckpointSaver` with every file written atomically (temporary file, then
    rename), so a process killed while saving never leaves a truncated checkpoint that a resume would read; each
    checkpoint's content digest recorded next to it (``.sha256``), so damage is found before a resume uses it; the
    checkpoints it replaces removed only once the new one is complete, so a kill at any instant keeps at least one;
    and the temporary files of an earlier killed save removed when it is attached. MONAI turns atomic saving off for
    file permissions; current Ignite restores group/other read access after the rename. A run stopped by a
    non-finite loss (``FloatingPointError``) saves no final checkpoint of its poisoned state. The engine the saver is
    attached to is saved too, under ``engine_key`` (its iteration and epoch are what a resume needs; a bundle config
    cannot reference the trainer from the trainer's own handlers).

    Args:
        args: positional arguments of ``CheckpointSaver`` (``save_dir``, ``save_dict``, ...).
        engine_key: key of the attached engine's state in the checkpoint (``None``: not saved).
        kwargs: keyword arguments of ``CheckpointSaver``.
    """

    def __init__(self, *args: Any, engine_key: str | None = "trainer", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.engine_key = engine_key
        for checkpoint in self._checkpoints():
            checkpoint.save_handler = _SafeDiskSaver(checkpoint.save_handler)

    def _checkpoints(self) -> list:
        found = (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint)
        return [c for c in found if c is not None]

    def attach(self, engine: Engine) -> None:
        for path in _remove_leftovers(Path(self.save_dir)):
            self.logger.warning(f"removed {path}, the temporary file of a save that was interrupted")
        if self.engine_key is not None:
            for checkpoint in self._checkpoints():
                checkpoint.to_save[self.engine_key] = engine
        super().attach(engine)

    def exception_raised(self, engine: Engine, e: Exception) -> None:
        """Save the final checkpoint on an exception, except a ``FloatingPointError``: a non-finite loss has
        already passed through the normalisation layers' running statistics, so that state must not be saved
        (the previous checkpoints hold the last good one)."""
        if isinstance(e, FloatingPointError):
            self.logger.warning(f"{e}; no checkpoint saved for this state.")
            raise e
        super().exception_raised(engine, e)


def checkpoints(checkpoint_dir: str | os.PathLike) -> list[Path]:
    """
    The checkpoints in ``checkpoint_dir`` (files ``*iteration=N.pt`` or ``*final_iteration=N.pt`` as written by
    :py:class:`AtomicCheckpointSaver`), newest first.
    """
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP.search(p.name)) and p.is_file()]
    return [p for _, p in sorted(found, key=lambda x: (x[0], "final" in x[1].name), reverse=True)]


def latest_checkpoint(checkpoint_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint in ``checkpoint_dir`` (:py:func:`checkpoints`), or ``None``."""
    found = checkpoints(checkpoint_dir)
    return found[0] if found else None


def state_problem(state: Any, where: str = "") -> str | None:
    """
    The first non-finite floating-point tensor in a loaded state (nested mappings and sequences, e.g. a checkpoint's
    network, teacher and optimizer states), as a sentence, or ``None``.
    """
    if torch.is_tensor(state):
        if state.is_floating_point() and not bool(torch.isfinite(state).all()):
            return f"holds non-finite values in {where or 'a tensor'}"
        return None
    if isinstance(state, Mapping):
        items = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    else:
        return None
    for key, value in items:
        problem = state_problem(value, f"{where}.{key}" if where else str(key))
        if problem is not None:
            return problem
    return None


def _read_checkpoint(path: Path, map_location: Any) -> tuple[Any, str | None]:
    """A checkpoint's content and what is wrong with it (digest, readability, non-finite values)."""
    problem = digest_problem(path)
    if problem is not None:
        return None, problem
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated, empty or foreign file
        return None, f"is not a readable torch checkpoint ({type(e).__name__}: {e})"
    return state, state_problem(state)


class ResumeFromCheckpoint:
    """
    At ``Events.STARTED``, restore ``load_dict`` (network, teacher, optimizer, scheduler, trainer state...) from the
    latest checkpoint in ``checkpoint_dir``, if there is one: rerunning an interrupted command continues the run.
    Attach it before handlers that look at the iteration count at start (MONAI registers ``train_handlers`` in
    order).

    A checkpoint whose content does not match its recorded digest, that cannot be read, or that holds non-finite
    values is skipped with a warning naming it and why, and the newest intact one is used: a resumed run never trains
    on damaged state. When every checkpoint is damaged, the resume is refused naming the folder.

    An engine with a ``run_settings`` dict (:py:class:`~monai_mlbseg.engines.MetaTrainer`: its stage-2 method and
    options) has them recorded in ``checkpoint_dir/run_settings.json`` when a run starts, and a resume with other
    settings is refused before any training, naming the folder and the settings that differ: otherwise a rerun
    with, say, another ``stage2_method`` in the same output folder would silently reload the old method's model.
    The number of epochs is not a setting: a finished run can be continued for longer.

    Args:
        checkpoint_dir: where :py:class:`AtomicCheckpointSaver` writes.
        load_dict: objects to restore, as for :py:class:`~monai.handlers.CheckpointLoader`.
        map_location: passed to ``torch.load``.
        strict: strict state-dict loading.
        engine_key: the attached engine's state is restored from this key (``None``: not restored).

    Raises:
        InputError: when the engine's ``run_settings`` differ from those recorded with the checkpoints, when
            checkpoints exist without recorded settings (written by version 0.1.0, whose settings are unknown), or
            when every checkpoint is damaged.
    """

    #: the file, in ``checkpoint_dir``, that records the engine's ``run_settings``
    settings_file = "run_settings.json"

    def __init__(
        self,
        checkpoint_dir: str | os.PathLike,
        load_dict: Mapping[str, Any],
        map_location: Any = None,
        strict: bool = True,
        engine_key: str | None = "trainer",
    ) -> None:
        self.checkpoint_dir = Path(checkpoint_dir)
        self.engine_key = engine_key
        self.load_dict = dict(load_dict)
        self.map_location = map_location
        self.strict = strict
        self.logger = logging.getLogger(__name__)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        found = checkpoints(self.checkpoint_dir)
        settings = getattr(engine, "run_settings", None)
        if settings is not None:
            self._check_settings(dict(settings), resuming=bool(found))
        if not found:
            return
        damaged = []
        for path in found:
            state, problem = _read_checkpoint(path, self.map_location)
            if problem is None:
                break
            damaged.append(Problem(str(path), problem))
            self.logger.warning(f"{path} {problem}: not used")
        else:
            what = "has no intact checkpoint (each is listed below); move or delete the folder to train from the start"
            problems = [Problem(str(self.checkpoint_dir), what), *damaged]
            raise InputError(problems, "stage cannot resume")
        load_dict = dict(self.load_dict)
        if self.engine_key is not None:
            load_dict[self.engine_key] = engine
        if len(load_dict) == 1 and next(iter(load_dict)) not in state:  # a plain state dict (MONAI's convention)
            state = {next(iter(load_dict)): state}
        prior_max_epochs = engine.state.max_epochs  # a finished run can be continued for longer
        Checkpoint.load_objects(to_load=load_dict, checkpoint=state, strict=self.strict)
        if prior_max_epochs is not None and engine.state.epoch > prior_max_epochs:
            what = (
                f"holds a run at epoch {engine.state.epoch}, beyond this run's {prior_max_epochs} epochs; give more "
                "epochs to continue it"
            )
            raise InputError([Problem(str(path), what)], "stage cannot resume")
        engine.state.max_epochs = prior_max_epochs
        fallback = f", the newest intact checkpoint ({len(damaged)} newer damaged)" if damaged else ""
        self.logger.info(
            f"resumed from {path}{fallback} at iteration {engine.state.iteration} (epoch {engine.state.epoch})"
        )

    def _check_settings(self, settings: dict[str, Any], resuming: bool) -> None:
        record = self.checkpoint_dir / self.settings_file
        if not resuming:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(record, settings)
            return
        context = "stage 2 cannot resume"
        if not record.is_file():
            what = (
                f"holds checkpoints without {self.settings_file}, so it cannot be checked that they were trained "
                "with the current settings (stage-2 method and options)"
            )
            raise InputError([Problem(str(self.checkpoint_dir), what + _FRESH_START)], context)
        try:
            recorded = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            what = f"cannot be read as the run's recorded settings ({e})" + _FRESH_START
            raise InputError([Problem(str(record), what)], context) from None
        current = json.loads(json.dumps(settings))
        changed = sorted(k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k))
        if changed:
            details = "; ".join(f"{k}: {recorded.get(k)!r} there, {current.get(k)!r} now" for k in changed)
            what = f"holds checkpoints of a run with other settings ({details}); resuming would continue that run"
            raise InputError([Problem(str(self.checkpoint_dir), what + _FRESH_START)], context)


def save_weights(network: nn.Module, path: str | os.PathLike) -> Path:
    """Save the (DDP-unwrapped) network's state dict to ``path`` atomically: the bundle's ``models/model.pt``."""
    return atomic_torch_save(unwrap_network(network).state_dict(), path)


def load_weights(
    network: nn.Module, path: str | os.PathLike, map_location: Any = "cpu", key: str = "network"
) -> nn.Module:
    """
    Load weights into ``network`` from a plain state dict or a checkpoint holding one under ``key``
    (``torch.load(..., weights_only=True)``: no code in the file is executed), after checking the file against its
    recorded digest and the weights for non-finite values.

    Raises:
        InputError: the file is missing, unreadable, damaged (not its recorded digest), not a state dict, holds
            non-finite values, or is from another network (the message lists missing/unexpected keys and shape
            mismatches).
    """
    where = str(path)
    if not Path(path).is_file():
        raise InputError([Problem(where, "checkpoint file not found")], "cannot load weights")
    damaged = digest_problem(path)
    if damaged is not None:
        raise InputError([Problem(where, damaged)], "cannot load weights")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise InputError(
            [Problem(where, f"not a readable weights-only torch checkpoint ({e})")], "cannot load weights"
        ) from None
    if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
        state = state[key]
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise InputError(
            [Problem(where, "is not a state dict (a mapping of parameter names to tensors)")], "cannot load weights"
        )
    non_finite = state_problem(state)
    if non_finite is not None:
        raise InputError([Problem(where, non_finite)], "cannot load weights")
    module = unwrap_network(network)
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {', '.join(unexpected[:3])})")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches (e.g. {'; '.join(mismatched[:3])})")
        raise InputError(
            [Problem(where, f"does not match the network {type(module).__name__}: " + ", ".join(parts))],
            "cannot load weights",
        )
    module.load_state_dict(state)
    return network
