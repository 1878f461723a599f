"""Command line: ``python -m monai_mlbseg <command> [--option value ...]`` (``--help`` lists the commands)."""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import fire

from monai_mlbseg.bundles import bundles
from monai_mlbseg.data import check, make_synthetic_dataset, prepare
from monai_mlbseg.demo import demo
from monai_mlbseg.evaluation import evaluate_files
from monai_mlbseg.utils import InputError

__all__ = ["main", "COMMANDS"]


def _cli(fn: Callable, show: Callable[[Any], None] | None = None) -> Callable:
    """
    Run ``fn`` as a command: input errors become a message on stderr and exit status 2 (no traceback); ``show``
    prints what it returned.
    """

    @functools.wraps(fn)
    def run(*args, **kwargs) -> None:
        try:
            result = fn(*args, **kwargs)
        except InputError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        if show is not None:
            show(result)

    return run


def _show_demo(report: Path) -> None:
    """The demo's metrics table and the path of its report."""
    summary = json.loads((report.parent / "summary.json").read_text(encoding="utf-8"))
    print(summary["table"])
    print(f"\nreport: {report}")


def synth(
    out: str,
    format: str = "uamt_h5",
    num_cases: int = 12,
    shape: Sequence[int] = (96, 96, 48),
    seed: int = 0,
) -> str:
    """
    Write a synthetic data set in a real on-disk format, e.g. to smoke-test a bundle or the data check.

    Args:
        out: the folder to write (created; the cases and, for ``uamt_h5``, the split lists).
        format: the layout, one of ``uamt_h5``, ``la_raw``, ``msd_heart``, ``promise12``, ``msd_prostate``.
        num_cases: how many labeled cases.
        shape: the spatial shape of every volume, slices along the last axis.
        seed: seed of the generator (the same seed writes the same volumes).

    Returns:
        the folder's absolute path.

    Example::

        python -m monai_mlbseg synth /tmp/la --format uamt_h5 --num_cases 8 --shape 64,64,24
    """
    ids = make_synthetic_dataset(out, format, num_cases=num_cases, shape=tuple(shape), seed=seed)
    print(f"wrote {len(ids)} {format} cases to {out}")
    return str(Path(out).resolve())


def _paths(value: str | Sequence[str]) -> list[str]:
    """A list of paths from the command line: one path, a comma-separated list, or a sequence."""
    return [p for p in value.split(",") if p] if isinstance(value, str) else [str(p) for p in value]


def evaluate(predictions: Sequence[str], labels: Sequence[str], out: str = ".", prefix: str = "metrics") -> str:
    """
    Per-case Dice, Jaccard, 95HD and ASD (voxels and mm) of prediction masks against label files, written as
    ``<out>/<prefix>.csv`` and ``.json`` and printed as a table.

    Args:
        predictions: the prediction mask files (one path, or a comma-separated list).
        labels: the label files, in the same order as ``predictions``.
        out: the folder of the metric files (created).
        prefix: the metric files' name without its extension.

    Returns:
        the path of the JSON file.

    Example::

        python -m monai_mlbseg evaluate --predictions a_seg.nii.gz,b_seg.nii.gz --labels a.nii.gz,b.nii.gz
    """
    preds, labs = _paths(predictions), _paths(labels)
    report = evaluate_files(preds, labs, out_dir=out, prefix=prefix)
    print(report.to_markdown())
    return str(Path(out).resolve() / f"{prefix}.json")


def monailabel_app(out: str, bundles: str | Sequence[str] = "mlbseg_la") -> str:
    """
    Write a MONAI Label app folder: ``main.py`` and the bundles under ``model/<name>/``, ready for
    ``monailabel start_server --app OUT --studies STUDIES --conf models NAME``. Rewriting an existing app keeps its
    bundles' trained weights (``models/``) and runs (``work/``).

    Args:
        out: the app folder.
        bundles: the bundle names (``mlbseg_la``, ``mlbseg_prostate``), comma-separated or a list.

    Returns:
        the app folder.

    Example::

        python -m monai_mlbseg monailabel_app apps/mlbseg
    """
    from monai_mlbseg.monailabel import write_app

    names = tuple(_paths(bundles))
    folder = write_app(out, names).resolve()
    print(f"wrote the MONAI Label app {folder}; start it with")
    print(f"  monailabel start_server --app {folder} --studies <studies folder> --conf models {','.join(names)}")
    return str(folder)


COMMANDS = {
    "demo": _cli(demo, _show_demo),
    **{
        name: _cli(fn)
        for name, fn in {
            "prepare": prepare,
            "check": check,
            "synth": synth,
            "evaluate": evaluate,
            "bundles": bundles,
            "monailabel_app": monailabel_app,
        }.items()
    },
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
