"""Command line: ``python -m monai_mlbseg <command> [--option value ...]`` (``--help`` lists the commands)."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import fire

from monai_mlbseg.bundles import bundles
from monai_mlbseg.data import check, make_synthetic_dataset, prepare
from monai_mlbseg.demo import run_demo
from monai_mlbseg.evaluation import evaluate_files
from monai_mlbseg.utils import InputError

__all__ = ["main", "COMMANDS"]


def _cli(fn: Callable) -> Callable:
    """Run ``fn`` as a command: input errors become a message on stderr and exit status 2 (no traceback)."""

    @functools.wraps(fn)
    def run(*args, **kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except InputError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return run


def synth(
    out: str,
    format: str = "uamt_h5",
    num_cases: int = 12,
    shape: Sequence[int] = (96, 96, 48),
    seed: int = 0,
) -> str:
    """Write a synthetic data set in a real on-disk format (``uamt_h5``, ``la_raw``, ``msd_heart``, ``promise12``,
    ``msd_prostate``), e.g. to smoke-test a bundle. Returns the folder."""
    ids = make_synthetic_dataset(out, format, num_cases=num_cases, shape=tuple(shape), seed=seed)
    print(f"wrote {len(ids)} {format} cases to {out}")
    return str(Path(out).resolve())


def evaluate(predictions: Sequence[str], labels: Sequence[str], out: str = ".", prefix: str = "metrics") -> str:
    """Per-case Dice, Jaccard, 95HD and ASD (voxels and mm) of prediction masks against label files (two lists of
    files in the same order), written as ``<out>/<prefix>.csv`` and ``.json``."""
    preds = [predictions] if isinstance(predictions, str) else list(predictions)
    labs = [labels] if isinstance(labels, str) else list(labels)
    report = evaluate_files(preds, labs, out_dir=out, prefix=prefix)
    print(report.to_markdown())
    return str(Path(out).resolve() / f"{prefix}.json")


COMMANDS = {
    name: _cli(fn)
    for name, fn in {
        "demo": run_demo,
        "prepare": prepare,
        "check": check,
        "synth": synth,
        "evaluate": evaluate,
        "bundles": bundles,
    }.items()
}


#: options whose value is passed on as the typed text (JSON), not parsed by Fire (which reads ``true`` as a string)
VERBATIM_OPTIONS = ("--overrides",)


def _verbatim(argv: Sequence[str]) -> list[str]:
    """``argv`` with the values of :py:data:`VERBATIM_OPTIONS` quoted as Python strings, so Fire keeps them as text."""
    out, quote_next = [], False
    for arg in argv:
        if quote_next:
            out.append(repr(arg))
            quote_next = False
            continue
        name, eq, value = arg.partition("=")
        if name in VERBATIM_OPTIONS and eq:
            out.append(f"{name}={value!r}")
        else:
            out.append(arg)
            quote_next = arg in VERBATIM_OPTIONS
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m monai_mlbseg``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    fire.Fire(COMMANDS, command=_verbatim(argv), name="python -m monai_mlbseg")


if __name__ == "__main__":
    main()
