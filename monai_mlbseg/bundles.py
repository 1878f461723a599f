"""
The two bundles (``bundles/mlbseg_la``, ``bundles/mlbseg_prostate``) generated from one template.

What the bundles share lives once, in the package data folder ``monai_mlbseg/bundle_template/``: the config files
(``configs/*.json``, ``configs/logging.conf``), ``LICENSE`` and ``large_files.yml``. A string value
``"<<name>>"`` anywhere in a template JSON file is a placeholder, replaced by entry ``name`` of the bundle's values
file ``bundle_template/values/<bundle>.json`` (any JSON value: the data folder, format, split, spacing, metadata
texts), except ``<<package_version>>``: the package's own ``__version__``, which the bundles require. Every
placeholder must have a value and every value must be used. Each generated bundle is an ordinary, self-contained
MONAI bundle folder; its files not in the template (``docs/README.md``, the left-atrium bundle's
``train.list`` / ``test.list`` and 3D configs) are written by hand.

``python -m monai_mlbseg bundles --write`` regenerates the committed bundles (and the table of stage-2 methods in
each bundle's ``docs/README.md``, from :py:data:`~monai_mlbseg.engines.STAGE2_METHODS` and the measured effects of
``docs/results/effects.json``), ``python -m monai_mlbseg
bundles`` checks that they are up to date (``tests/bundles/test_bundles.py`` runs the check).

Why placeholders and not MONAI's config merge (a shared base config plus a small per-bundle file of ``#``-path
overrides, which ``ConfigParser.load_config_files`` supports): a bundle value reaches several files (the data folder
and format are read by ``train.json``, ``inference.json`` and ``evaluate.json``, the method and its texts by
``metadata.json``), so a per-bundle override file would restate each value once per file; a misspelled ``#`` path
merges silently as a new key, where a placeholder without a value, or a value no file uses, is an error here; and
the generated bundles must be single self-contained files anyway, since MONAI Label and ``monai.bundle download``
read ``configs/train.json`` alone. The template files stay valid JSON, and every generated bundle is checked as MONAI
config by the tests (parsed, instantiated, ``verify_net_in_out``, trained).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from monai_mlbseg import __version__
from monai_mlbseg.utils import atomic_write_text

__all__ = [
    "BUNDLE_NAMES",
    "TEMPLATE_FILES",
    "measured_effects",
    "RUN_IDS",
    "ids_table",
    "methods_table",
    "render_bundle",
    "render_readme",
    "write_bundle",
    "stale_files",
    "bundles",
]

#: the bundles generated from the template (their values files are ``bundle_template/values/<name>.json``)
BUNDLE_NAMES = ("mlbseg_la", "mlbseg_prostate")
#: the files of every bundle that come from the template, relative to the bundle folder
TEMPLATE_FILES = (
    "configs/train.json",
    "configs/inference.json",
    "configs/evaluate.json",
    "configs/multi_gpu_train.json",
    "configs/metadata.json",
    "configs/logging.conf",
    "LICENSE",
    "large_files.yml",
)
#: the placeholder of the package version the bundles require (rendered from ``monai_mlbseg.__version__``)
PACKAGE_VERSION = "package_version"
#: the template folder (package data)
TEMPLATE_DIR = Path(__file__).resolve().parent / "bundle_template"
#: the committed bundles of a source checkout
DEFAULT_ROOT = Path(__file__).resolve().parents[1] / "bundles"
#: the measured effects of the stage-2 methods in a source checkout (the README tables are generated from them)
EFFECTS_FILE = Path(__file__).resolve().parents[1] / "docs" / "results" / "effects.json"


def _template(path: str) -> str:
    return (TEMPLATE_DIR / path).read_text(encoding="utf-8")


def _placeholder(value: Any) -> str | None:
    if isinstance(value, str) and value.startswith("<<") and value.endswith(">>"):
        return value[2:-2]
    return None


def _fill(node: Any, values: Mapping[str, Any], used: set[str], where: str) -> Any:
    """``node`` with every placeholder replaced by its value (recording the names used)."""
    name = _placeholder(node)
    if name is not None:
        if name not in values:
            raise KeyError(f"{where}: placeholder <<{name}>> has no value.")
        used.add(name)
        return values[name]
    if isinstance(node, dict):
        return {k: _fill(v, values, used, where) for k, v in node.items()}
    if isinstance(node, list):
        return [_fill(v, values, used, where) for v in node]
    return node


def render_bundle(name: str, values: Mapping[str, Any] | None = None) -> dict[str, str]:
    """
    The text of every template file of bundle ``name``: JSON files with their placeholders filled (written with an
    indent of 4 and a final newline), the other files as they are.

    Args:
        name: one of :py:data:`BUNDLE_NAMES` (selects the values file).
        values: the placeholder values; default: the bundle's values file.

    Returns:
        ``{path relative to the bundle folder: file text}`` for the paths of :py:data:`TEMPLATE_FILES`.

    Raises:
        ValueError: ``name`` is not a bundle of the template, or a value is not used by any template file.
        KeyError: a placeholder has no value.

    Example::

        files = render_bundle("mlbseg_la")
        json.loads(files["configs/train.json"])["data_format"]  # "uamt_h5"
    """
    if name not in BUNDLE_NAMES:
        raise ValueError(f"unknown bundle {name!r}, expected one of {BUNDLE_NAMES}.")
    if values is None:
        values = json.loads(_template(f"values/{name}.json"))
    if PACKAGE_VERSION in values:
        raise ValueError(f"{name}: <<{PACKAGE_VERSION}>> is the package's own version; a values file cannot set it.")
    values = {**values, PACKAGE_VERSION: __version__}
    used: set[str] = set()
    files = {}
    for path in TEMPLATE_FILES:
        text = _template(path)
        if path.endswith(".json"):
            text = json.dumps(_fill(json.loads(text), values, used, path), indent=4) + "\n"
        files[path] = text
    unused = set(values) - used
    if unused:
        raise ValueError(f"{name}: values {sorted(unused)} are not used by any template file.")
    return files


#: the top-level ids of ``configs/train.json`` that describe a run, with what each sets: a driver (the demo, the
#: benchmarks, a MONAI Label task) sets these and no nested id (:py:func:`~monai_mlbseg.recipe.training_workflow`)
RUN_IDS = {
    "dataset_dir": "the data folder",
    "data_format": "its layout (`uamt_h5`, `la_raw`, `msd_heart`, `promise12`, `msd_prostate`)",
    "datalist_file": "a datalist JSON instead of the folder's own split (`null`: the split)",
    "split": "the case lists and the number of labeled cases",
    "device": "the training device",
    "seed": "the seed of the whole run",
    "image_size": "the slice size the network sees",
    "features": "the network's widths per level",
    "lr": "the learning rate of stage 2 (and of stage 1, unless `stage1_lr`)",
    "stage1_lr": "the learning rate of stage 1",
    "stage1_batch_size": "labeled slices per stage-1 step",
    "unlabeled_batch_size": "unlabeled slices per stage-2 iteration",
    "clean_batch_size": "labeled slices per stage-2 iteration",
    "stage1_iterations": "stage-1 iterations (`null`: `stage1#max_epochs` epochs of the labeled slices)",
    "stage2_steps": "stage-2 optimizer steps, turned into iterations by the method's schedule (`null`: 120 epochs of "
    "the unlabeled slices)",
    "max_epoch_length": "the longest epoch when a length is given in iterations or steps (stage 2's learning rate "
    "decays per epoch)",
    "stage2_method": "the stage-2 method, a key of `monai_mlbseg.engines.STAGE2_METHODS`",
    "stage2_options": "options on top of the method (`grad_clip`, `student_augment`, `clean_augment`, `weighting`, "
    "`cutmix`, `feature_dropout`, `copy_paste`, `reuse_meta_grad`, `meta_params`)",
    "stage2_control": "train the labeled-only control matched to the method instead of the method",
    "use_unlabeled": "read the unlabeled cases (`false`: no stage 1 or bootstrap, stage 2 on the labeled cases)",
    "output_dir": "where runs are kept, one folder per data and settings",
    "run_dir": "the run's folder (default: a folder of `output_dir` named by a fingerprint of the data files' names "
    "and content and the settings)",
    "stage1_dir": "where stage 1's weights, checkpoints and the initial labels are (default: `run_dir`); give an "
    "earlier run's folder to keep its stage 1 after correcting labels",
    "ckpt_dir": "where the final `model.pt` is written",
    "init_weights": "weights loaded into the network before stage 1 (`null`: none); MONAI Label's train task passes "
    "the current `models/model.pt`",
    "train_options": "the `/train` options the package's MONAI Label app shows in 3D Slicer's panel, with their "
    "defaults (method, budgets, unlabeled studies)",
    "progress": "progress bars while the slices are cached",
}
#: the markers around the table of run ids in a bundle's ``docs/README.md``
IDS_BEGIN = "<!-- run-ids: generated from monai_mlbseg.bundles.RUN_IDS -->"
IDS_END = "<!-- /run-ids -->"

#: the markers around the table of stage-2 methods in a bundle's ``docs/README.md``
TABLE_BEGIN = "<!-- stage2-methods: generated from monai_mlbseg.engines.STAGE2_METHODS -->"
TABLE_END = "<!-- /stage2-methods -->"


def measured_effects(path: str | os.PathLike = EFFECTS_FILE) -> dict[str, dict[str, str]]:
    """
    The measured effect and cost of every stage-2 method, by name, from the committed results (``methods`` of
    ``docs/results/effects.json`` in a source checkout).

    Raises:
        FileNotFoundError: when the file is missing (it is part of the source checkout, not of the package).
        ValueError: when a method of :py:data:`~monai_mlbseg.engines.STAGE2_METHODS` has no ``measured`` and ``cost``
            entry there.
    """
    from monai_mlbseg.engines import STAGE2_METHODS

    effects = json.loads(Path(path).read_text(encoding="utf-8"))["methods"]
    missing = [k for k in STAGE2_METHODS if not {"measured", "cost"} <= set(effects.get(k, {}))]
    if missing:
        raise ValueError(f"{path}: no measured effect and cost for the stage-2 methods {missing}.")
    return effects


def methods_table(default: str, effects: Mapping[str, Mapping[str, str]] | None = None) -> str:
    """
    The markdown table of the stage-2 methods of :py:data:`~monai_mlbseg.engines.STAGE2_METHODS` (method, what it
    does, measured effect, cost), ``default`` marked: the one list the bundle READMEs show.

    Args:
        default: the bundle's default method.
        effects: measured effect and cost by method (default: :py:func:`measured_effects`).
    """
    from monai_mlbseg.engines import STAGE2_METHODS

    effects = measured_effects() if effects is None else effects
    rows = ["| `--stage2_method` | what it does | measured on real left-atrium scans | cost |", "|---|---|---|---|"]
    for key, method in STAGE2_METHODS.items():
        name = f"`{key}` (default)" if key == default else f"`{key}`"
        rows.append(f"| {name} | {method.description} | {effects[key]['measured']} | {effects[key]['cost']} |")
    return "\n".join(rows)


def ids_table() -> str:
    """The markdown table of :py:data:`RUN_IDS`: the top-level ids that describe a run."""
    rows = ["| id | what it sets |", "|---|---|"]
    rows += [f"| `{key}` | {text} |" for key, text in RUN_IDS.items()]
    return "\n".join(rows)


def _replace(text: str, begin: str, end: str, table: str, where: str) -> str:
    start, stop = text.find(begin), text.find(end)
    if start < 0 or stop < start:
        raise ValueError(f"{where}: no generated table between {begin!r} and {end!r}.")
    return text[: start + len(begin)] + "\n" + table + "\n" + text[stop:]


def render_readme(text: str, default: str, where: str = "README") -> str:
    """
    ``text`` (a bundle's ``docs/README.md``) with the part between :py:data:`TABLE_BEGIN` and :py:data:`TABLE_END`
    replaced by :py:func:`methods_table`, and the part between :py:data:`IDS_BEGIN` and :py:data:`IDS_END` by
    :py:func:`ids_table`.

    Raises:
        ValueError: when the markers are missing.
    """
    text = _replace(text, TABLE_BEGIN, TABLE_END, methods_table(default), where)
    return _replace(text, IDS_BEGIN, IDS_END, ids_table(), where)


def _readme(name: str, root: Path) -> tuple[Path, str] | None:
    """
    The path of bundle ``name``'s README under ``root`` and its text with the current methods table (``None`` when
    the folder has no README: it is written by hand, not by the template).
    """
    path = root / name / "docs" / "README.md"
    if not path.is_file():
        return None
    default = json.loads(_template(f"values/{name}.json"))["stage2_method"]
    return path, render_readme(path.read_text(encoding="utf-8"), default, str(path))


def write_bundle(name: str, dest: str | os.PathLike) -> Path:
    """
    Write the template files of bundle ``name`` into the folder ``dest`` (created; other files there are kept).

    Returns:
        ``dest`` as a resolved path.
    """
    dest = Path(dest).resolve()
    for path, text in render_bundle(name).items():
        (dest / path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(dest / path, text)
    return dest


def stale_files(root: str | os.PathLike = DEFAULT_ROOT) -> list[Path]:
    """
    The template files of the bundles under ``root`` (one folder per bundle) that are missing or differ from what
    the template generates.
    """
    root = Path(root)
    stale = []
    for name in BUNDLE_NAMES:
        for path, text in render_bundle(name).items():
            target = root / name / path
            if not target.is_file() or target.read_text(encoding="utf-8") != text:
                stale.append(target)
        readme = _readme(name, root)
        if readme is not None and readme[0].read_text(encoding="utf-8") != readme[1]:
            stale.append(readme[0])
    return stale


def bundles(write: bool = False, root: str = str(DEFAULT_ROOT)) -> list[str]:
    """
    Check (default) or regenerate the bundles' template files.

    Args:
        write: write the generated files into ``root``; otherwise only compare them.
        root: the folder holding one folder per bundle (default: the repository's ``bundles/``).

    Returns:
        the stale files (empty after ``write``).

    Raises:
        SystemExit: with status 1 when checking finds stale files.
    """
    if write:
        for name in BUNDLE_NAMES:
            print(f"wrote {write_bundle(name, Path(root) / name)}")
            readme = _readme(name, Path(root))
            if readme is not None:
                atomic_write_text(*readme)
        return []
    stale = [str(p) for p in stale_files(root)]
    if stale:
        print("out of date (edit monai_mlbseg/bundle_template/, then run `python -m monai_mlbseg bundles --write`):")
        print("\n".join(stale))
        raise SystemExit(1)
    print(f"the bundles in {root} match the template")
    return stale
