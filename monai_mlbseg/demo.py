"""
``python -m monai_mlbseg demo``: the left-atrium bundle (``bundles/mlbseg_la``) end to end on a generated
left-atrium-like data set, on a laptop CPU.

It writes synthetic volumes in the UA-MT HDF5 layout (the real loaders read them; the anatomy ``"la_demo"`` of
:py:data:`~monai_mlbseg.data.ANATOMIES` by default) and the demo's split of them as a datalist, writes the bundle
(from the package's bundle template, the same files as ``bundles/mlbseg_la``) to ``<out>/bundle``, and runs the
bundle's own workflows through :py:class:`monai.bundle.ConfigWorkflow` with small sizes as overrides: the training
workflow step by step (data check, stage 1, bootstrap, stage 2), and the evaluation workflow on the held-out volumes
after stage 1 and after stage 2. It writes metrics, figures and a ``report.md``.
Every step is resumable as the bundle's are: rerunning the same command after an interruption reuses stage 1 and
the initial labels, and stage 2 continues from its last checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Events
from ignite.handlers import ProgressBar
from monai.handlers import MetricLogger, from_engine

from monai_mlbseg.bundles import write_bundle
from monai_mlbseg.data import (
    build_datalist,
    get_format,
    load_datalist,
    load_volume_transforms,
    make_synthetic_dataset,
    read_case_list,
)
from monai_mlbseg.engines import STAGE2_METHODS, MetaIterationEvents, load_weights, stage2_terms
from monai_mlbseg.engines.stage2 import MetaWeighting
from monai_mlbseg.evaluation import SegmentationReport, compare_markdown
from monai_mlbseg.pipeline import logged_series
from monai_mlbseg.recipe import (
    TRAINING_STEPS,
    parsed,
    reseed_stage2,
    run_training_step,
    stage_length,
    stage_overrides,
    trainer_overrides,
    training_workflow,
)
from monai_mlbseg.utils import InputError, Problem, atomic_write_json, atomic_write_text
from monai_mlbseg.visualize import save_overlays, save_training_curves, save_weight_maps

__all__ = ["compare_in_words", "most_different_slices", "run_demo"]

logger = logging.getLogger("monai_mlbseg.demo")

#: the demo's sizes, sized for 2 CPU cores (every one is an argument of :py:func:`run_demo`)
SIZES = {
    "num_labeled": 4,
    "num_unlabeled": 16,
    "num_test": 16,
    "volume_shape": (80, 72, 32),
    "image_size": 64,
    "features": (8, 16, 32, 64),
    "stage1_iterations": 1000,
    "stage2_iterations": 300,
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
    "stage2_iterations": 6,
}


#: panels of the training-curve figure: stage-2 series grouped by what they measure
STAGE2_CURVES = {
    "stage 2 losses": ("loss", "loss_meta", "loss_clean"),
    "stage 2 labels vs ground truth (Dice)": ("dice_initial_gt", "dice_pseudo_gt", "dice_pred_gt"),
    "stage 2 weight shares": ("weight_initial", "weight_pseudo"),
}


def _as_sequence(value: str | Sequence[str]) -> Sequence[str]:
    """A comma-separated string (as typed on the command line) or a sequence of names."""
    return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value


def _mode_name(reuse_meta_grad: bool, meta_params: str | Sequence[str] | None, meta_step: bool = True) -> str:
    """Human-readable name of the stage-2 mode for the report (a method without a meta step has no mode)."""
    if not meta_step:
        return "no meta step"
    parts = (["reuse_meta_grad"] if reuse_meta_grad else []) + (
        [f"meta_params={'+'.join(map(str, _as_sequence(meta_params)))}"] if meta_params is not None else []
    )
    return ", ".join(parts) if parts else "faithful (reference)"


def _parse_overrides(overrides: dict[str, Any] | str | None) -> dict[str, Any]:
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


class _WeightMapKeeper:
    """
    Keeps the weight (trust) maps of the label sources of the latest stage-2 iteration whose slice shows foreground
    in a source's label (of the latest iteration while none has), for the figure: the views, the label of every
    source in them (whatever its name: MLB-Seg's ``initial`` and ``pseudo``, the weak-to-strong ``teacher``...) and
    the weights. A method without label sources has none.
    """

    def __init__(self) -> None:
        self.maps: dict[str, Any] | None = None
        self.weighting = ""
        self.foreground = False

    def __call__(self, engine: Any) -> None:
        maps = engine.state.weight_maps
        if maps is None or not maps.get("sources"):
            return
        k = maps["num_views"]  # references only: copied to the host once, for the figure
        sources = {str(name): label[:k, 0].detach() for name, label in maps["sources"].items()}
        foreground = bool(torch.stack([label[0].sum() for label in sources.values()]).max() >= 20)  # one sync
        if self.foreground and not foreground:
            return
        self.foreground |= foreground
        self.weighting = type(engine.weighting).__name__
        self.maps = {"views": maps["views"][:k, 0], "weights": maps["weights"][:k], "sources": sources}


#: the report's name of the control: labeled-only training matched to the demonstrated method
CONTROL_NAME = "labeled only, same perturbation"
#: the bundle override that turns the stage-2 workflow into the labeled-only control matched to its
#: ``stage2_method`` and ``stage2_options`` (:py:func:`~monai_mlbseg.engines.matched_control`)
CONTROL_OVERRIDES = {"stage2_control": True}


def _matched_control(
    bundle: Path, overrides: dict[str, Any], out_dir: Path, seed: int, iterations: int
) -> tuple[Path, dict[str, Any]]:
    """
    The labeled-only control matched to the demonstrated method: the bundle's stage-2 workflow with the same
    ``stage2_method`` but its parts from :py:func:`~monai_mlbseg.engines.matched_control` (:py:data:`CONTROL_OVERRIDES`:
    the method's strong perturbation on the labeled views, its clean loss, its gradient clip, the same optimizer) and
    no unlabeled volumes (its trainer then makes one clean step per iteration; the real-scan benchmark's ``control``
    runs), from the stage-1 weights, for ``iterations`` iterations, reseeded like stage 2. Only the unlabeled volumes
    differ from stage 2, so stage 2 against it is what they added.

    Args:
        bundle: the bundle folder.
        overrides: stage 2's training overrides (the user's included: their trainer options apply to both).
        out_dir: the demo's output folder: checkpoints in ``<out_dir>/checkpoints/control`` (a rerun continues),
            weights in ``<out_dir>/models/control/model.pt`` and the trainer's settings next to them in
            ``run_settings.json`` (a finished control with the same settings is not trained again).
        seed: stage 2's seed.
        iterations: its iterations (stage 2's optimizer steps: one clean step each).

    Returns:
        the path of the weights and the control trainer's ``run_settings``.

    Raises:
        InputError: when the folder holds a finished control with other settings (e.g. of another method, or the
            earlier demo's reference-settings control), which would not be this method's control.
    """
    model = out_dir / "models" / "control" / "model.pt"
    epoch_length, epochs = stage_length(iterations, 50)
    workflow = training_workflow(
        bundle,
        {
            **overrides,
            **CONTROL_OVERRIDES,
            "ckpt_dir": str(out_dir / "models" / "control"),
            "train#checkpoint_dir": str(out_dir / "checkpoints" / "control"),
            "train#trainer#max_epochs": epochs,
            "train#trainer#epoch_length": epoch_length,
        },
    )
    trained = model.is_file()
    if not trained:  # before the trainer is parsed: its mean teacher copies the network
        load_weights(parsed(workflow, "network"), out_dir / "models" / "stage1.pt")
    trainer = parsed(workflow, "train#trainer")
    recorded = model.parent / "run_settings.json"
    settings = json.loads(json.dumps(trainer.run_settings))
    if trained and (not recorded.is_file() or json.loads(recorded.read_text()) != settings):
        problem = "holds a finished control with other (or unrecorded) settings than this method's matched control"
        raise InputError(
            [Problem(str(model.parent), f"{problem}; use another output folder, or move or delete this one")],
            "the control cannot be reused",
        )
    if not trained:
        atomic_write_json(recorded, settings)  # before training: a finished control always has its settings
        reseed_stage2(workflow, seed)
        run_training_step(workflow, "stage 2")
    return model, trainer.run_settings


def _part_text(described: Any) -> str:
    """A part described by :py:func:`~monai_mlbseg.utils.describe_settings` as ``Class(arg=value, ...)``."""
    if isinstance(described, dict) and "_target_" in described:
        args = ", ".join(f"{k}={_part_text(v)}" for k, v in described.items() if k != "_target_")
        return f"{str(described['_target_']).rsplit('.', 1)[-1]}({args})"
    return "none" if described is None else str(described)


def _report_rows(
    report1: SegmentationReport, report2: SegmentationReport, name: str, control: SegmentationReport | None
) -> dict[str, SegmentationReport]:
    """The rows of the metrics table: stage 1, the matched labeled-only control (when run), stage 2."""
    rows = {"labeled only (stage 1)": report1}
    if control is not None:
        rows[f"{CONTROL_NAME} (control)"] = control
    rows[f"{name} (stage 2)"] = report2
    return rows


def _evaluate(
    bundle: Path, overrides: dict[str, Any], model: Path, out_dir: Path, name: str
) -> tuple[SegmentationReport, dict[str, np.ndarray]]:
    """
    The bundle's evaluation workflow (``inference.json`` + ``evaluate.json``) with the weights ``model``: the masks
    in ``<out_dir>/eval_<name>``, the metrics in ``<out_dir>/metrics_<name>.csv`` / ``.json``. Returns the report
    and the predicted masks by case id.
    """
    workflow = training_workflow(
        bundle,
        {
            **overrides,
            "model_path": str(model),
            "output_dir": str(out_dir / f"eval_{name}"),
            "handlers#1#output_dir": str(out_dir),
            "handlers#1#prefix": f"metrics_{name}",
        },
        configs=("inference.json", "evaluate.json"),
        workflow_type="infer",
    )
    predictions: dict[str, np.ndarray] = {}

    def keep(engine: Any) -> None:
        for item, output in zip(engine.state.batch, engine.state.output):
            predictions[str(item["case_id"])] = output["pred"][0].cpu().numpy()

    evaluator = parsed(workflow, "evaluator")
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, keep)
    workflow.run()
    workflow.finalize()
    return parsed(workflow, "handlers#1").report, predictions


def most_different_slices(
    first: Mapping[str, Any],
    second: Mapping[str, Any],
    count: int = 4,
    per_case: int | None = None,
    labels: Mapping[str, Any] | None = None,
) -> list[tuple[str, int, int]]:
    """
    The slices (along the last axis) where two methods' predicted masks of the same volumes disagree most: the
    largest numbers of pixels that one predicts as foreground and the other not. For figures that show where the
    methods differ rather than slices that every method gets right.

    Args:
        first: case id -> predicted mask ``[..., D]`` (or probabilities: ``>= 0.5`` is foreground), e.g. the
            control's.
        second: the same cases' masks of the other method, each of the same shape.
        count: the number of slices to pick (fewer when the volumes have fewer slices).
        per_case: at most this many slices of one volume (default ``ceil(count / number of volumes)``: from distinct
            volumes when there are enough).
        labels: optional ground-truth masks of the same cases, only to break ties.

    Returns:
        ``[(case_id, z, differing_pixels)]``, most differing first; ties go to the slice with more foreground in
        either mask, then more ground-truth foreground (with ``labels``), then to the earlier case of ``first`` and
        the lower ``z``.

    Raises:
        ValueError: for no cases, other cases in ``second`` (or ``labels``), masks of different shapes, or ``count``
            / ``per_case`` below 1.

    Example::

        most_different_slices({"a": control_mask}, {"a": method_mask}, count=2)  # [("a", 12, 310), ("a", 13, 275)]
    """
    if not first:
        raise ValueError("most_different_slices needs at least one case.")
    for other in (second, labels if labels is not None else second):
        if set(first) != set(other):
            raise ValueError(f"the sets of masks have different cases: {sorted(set(first) ^ set(other))}.")
    if count < 1 or (per_case is not None and per_case < 1):
        raise ValueError(f"count and per_case must be >= 1, got {count} and {per_case}.")
    cap = per_case if per_case is not None else math.ceil(count / len(first))
    candidates = []
    for order, case in enumerate(first):
        a, b = (np.asarray(masks[case]) >= 0.5 for masks in (first, second))
        g = np.asarray(labels[case]) >= 0.5 if labels is not None else np.zeros_like(a)
        if a.shape != b.shape or a.shape != g.shape or a.ndim < 1:
            raise ValueError(f"case {case!r}: masks of shapes {a.shape}, {b.shape} and {g.shape}.")
        axes = tuple(range(a.ndim - 1))
        differ, union, truth = (a != b).sum(axis=axes), (a | b).sum(axis=axes), g.sum(axis=axes)
        candidates += [(-int(differ[z]), -int(union[z]), -int(truth[z]), order, z, case) for z in range(a.shape[-1])]
    chosen: list[tuple[str, int, int]] = []
    taken: Counter = Counter()
    for differ, *_, z, case in sorted(candidates, key=lambda c: c[:5]):
        if taken[case] < cap:
            chosen.append((str(case), z, -differ))
            taken[case] += 1
            if len(chosen) == count:
                break
    return chosen


def _overlay_slices(
    loaded: dict[str, Any], predictions: dict[str, dict[str, np.ndarray]], chosen: list[tuple[str, int, int]]
) -> tuple[list, list, dict[str, list], list[str]]:
    """
    The images, labels, every row's predictions and titles of the ``chosen`` ``(case_id, z, pixels)`` slices of the
    ``loaded`` test volumes (by case id).
    """
    images, labels, preds = [], [], {name: [] for name in predictions}
    titles = []
    for case, z, differ in chosen:
        data = loaded[case]
        images.append(data["image"][0, :, :, z].numpy())
        labels.append(data["label"][0].numpy()[:, :, z])
        for name in predictions:
            preds[name].append(predictions[name][case][:, :, z])
        titles.append(f"{case} z={z}: {differ} px differ")
    return images, labels, preds, titles


def _user_datalist(data_dir: Path, format: str, num_labeled: int, num_unlabeled: int, num_test: int) -> dict:
    """
    The demo's split of a user's folder: UA-MT style when it holds ``train.list`` (its first ``num_labeled`` cases
    labeled, the next ``num_unlabeled`` unlabeled; test = the first ``num_test`` of ``test.list``, else the last
    ``num_test`` of ``train.list``), otherwise the discovered cases in order (labeled, unlabeled, then test).
    """
    ids = read_case_list(data_dir / "train.list") if (data_dir / "train.list").is_file() else None
    if ids is not None and (data_dir / "test.list").is_file():
        test = read_case_list(data_dir / "test.list")[:num_test]
    else:
        ids = ids if ids is not None else list(get_format(format).discover(data_dir))
        ids, test = ids[: len(ids) - num_test], ids[len(ids) - num_test :]
    if len(ids) < num_labeled + 1 or not test:
        raise InputError(
            [
                Problem(
                    str(data_dir),
                    f"{len(ids) + len(test)} cases: too few for {num_labeled} labeled, unlabeled and test",
                )
            ],
            "demo data",
        )
    return build_datalist(
        data_dir,
        format,
        labeled=ids[:num_labeled],
        unlabeled=ids[num_labeled : num_labeled + num_unlabeled],
        test=test,
    )


def _demo_datalist(
    data_dir: Path,
    format: str,
    user_data: bool,
    anatomy: str,
    counts: tuple[int, int, int],
    volume_shape: tuple[int, ...],
    seed: int,
) -> dict:
    """The demo's datalist: the user's scans in ``data_dir``, or ``sum(counts)`` generated volumes written there."""
    num_labeled, num_unlabeled, num_test = counts
    if user_data:
        logger.info(f"using the {format} scans in {data_dir}")
        return _user_datalist(data_dir, format, num_labeled, num_unlabeled, num_test)
    total = sum(counts)
    logger.info(f"generating {total} synthetic {anatomy} volumes {volume_shape} in {data_dir}")
    ids = make_synthetic_dataset(data_dir, "uamt_h5", num_cases=total, shape=volume_shape, seed=seed, kind=anatomy)
    return build_datalist(
        data_dir,
        "uamt_h5",
        labeled=ids[:num_labeled],
        unlabeled=ids[num_labeled : num_labeled + num_unlabeled],
        test=ids[num_labeled + num_unlabeled :],
    )


def _weight_map_figure(path: Path, keeper: _WeightMapKeeper, method: str) -> str | None:
    """
    Draw the weight maps ``keeper`` holds (one label row and one weight row per label source, whatever its name) to
    ``path``; returns the figure's caption, or ``None`` (and draws nothing) when it holds none (a method without
    label sources).
    """
    if keeper.maps is None:
        return None
    m = keeper.maps
    sources = {name: label.cpu().numpy() for name, label in m["sources"].items()}
    views, weights = m["views"].cpu().numpy(), m["weights"].cpu().numpy()
    save_weight_maps(path, views, weights, source_labels=sources)
    names = ", ".join(f"`{name}`" for name in sources)
    return (
        f"Trust maps of one stage-2 iteration of {STAGE2_METHODS[method].title}: the views of an unlabeled slice, "
        f"then for each label source ({names}) its label in the views and its per-pixel weight (from the method's "
        f"pixel weighting, `{keeper.weighting}`)."
    )


def _figures(
    fig_dir: Path,
    test_items: list[dict],
    load: Any,
    predictions: dict[str, dict[str, np.ndarray]],
    compared: tuple[str, str],
    keeper: _WeightMapKeeper,
    history: dict,
    method: str,
    num_slices: int = 4,
) -> dict[str, str]:
    """
    The report's figures, by file name with their captions: the test slices where the two rows ``compared`` (the
    control's and the method's predictions, or stage 1's and the method's without a control) disagree most, the
    weight maps of a method with label sources (``keeper``), and the training curves.
    """
    first, second = compared
    per_case = math.ceil(num_slices / len(predictions[first]))
    items = {str(item["case_id"]): item for item in test_items}
    truth = {case: load(dict(item))["label"][0].numpy() >= 0.5 for case, item in items.items()}  # masks only
    chosen = most_different_slices(predictions[first], predictions[second], num_slices, per_case, truth)
    loaded = {case: load(dict(items[case])) for case in dict.fromkeys(case for case, _, _ in chosen)}
    images, labels, preds, titles = _overlay_slices(loaded, predictions, chosen)
    save_overlays(fig_dir / "test_overlays.png", images, labels, preds, titles=titles)
    figures = {
        "test_overlays.png": (
            f"The {len(chosen)} test slices where the predictions of “{first}” and “{second}” differ most, not easy "
            "ones: chosen by the number of pixels that one of the two predicts as foreground and the other not (at "
            f"most {per_case} per volume; each row's title gives the count). Ground truth (green) and prediction "
            "(red) of every row of the table, with the slice's Dice."
            + (
                " No test slice differs between the two: these are the slices with the most foreground."
                if chosen and chosen[0][2] == 0
                else ""
            )
        )
    }
    caption = _weight_map_figure(fig_dir / "weight_maps.png", keeper, method)
    if caption is not None:  # a method without label sources has no weight maps
        figures["weight_maps.png"] = caption
    if history:
        save_training_curves(fig_dir / "training_curves.png", history, title="MLB-Seg demo", smooth=25)
        figures["training_curves.png"] = "Training curves of both stages."
    return figures


def run_demo(
    out: str = "mlbseg_demo",
    data_dir: str | None = None,
    format: str = "uamt_h5",
    anatomy: str = "la_demo",
    num_labeled: int | None = None,
    num_unlabeled: int | None = None,
    num_test: int | None = None,
    volume_shape: Sequence[int] | None = None,
    image_size: int | None = None,
    features: Sequence[int] | None = None,
    stage1_iterations: int | None = None,
    stage2_iterations: int | None = None,
    stage1_batch: int = 4,
    lr: float = 0.01,
    seed: int = 0,
    device: str | None = None,
    reuse_meta_grad: bool = False,
    meta_params: str | Sequence[str] | None = None,
    overrides: dict[str, Any] | str | None = None,
    control: bool = True,
    quick: bool = False,
    progress: bool = True,
) -> str:
    """
    Run the left-atrium bundle end to end on synthetic left-atrium-like MRI and write a report.

    The bundle is written to ``<out>/bundle`` and run with overrides (data folder and datalist, sizes, iterations,
    learning rate, seed, device; stage-1 weights, initial labels and checkpoints under ``out``, the final weights in
    ``<out>/models``); stage 2 is reseeded, so that its randomness does not depend on whether stage 1 ran in this
    process. Both stages are evaluated by the bundle's evaluation workflow (masks in ``<out>/eval_stage1`` and
    ``<out>/eval_stage2``, metrics in ``<out>/metrics_stage1.csv`` / ``.json`` and ``metrics_stage2``). Every size
    is an option (e.g. ``--features 16,32,64,128,256 --image_size 144 --stage2_iterations 3000`` on a GPU). The
    method's settings are the bundle's (its ``stage2_method`` and the method's parts, SGD momentum 0.9, weight decay
    5e-4) except the learning rate, larger here for the short schedule; ``overrides`` changes any other id of the
    training workflow (e.g. ``{"train#trainer#grad_clip": 0.2}``). The report names the method and describes it from
    :py:data:`~monai_mlbseg.engines.STAGE2_METHODS`; the README gives the measured results.

    The default sizes (:py:data:`SIZES`) are for 2 CPU cores. The synthetic data (``"la_demo"``: the atrium is about
    6% of the voxels, in nearly one pose and with a nearly uniform blood pool like the real ones, with 1-3
    distractors of 0.6-1.0 times its intensity, half of them touching it, a tube through every slice in 80% of the
    volumes, contrast-to-noise 1.5-3.5) leave labeled-only training clearly imperfect.
    ``anatomy="la"`` is the harder problem of the tests and benchmarks (the atrium 2.5% of the voxels, 2-4
    distractors as bright as it), on which these sizes leave stage 1 at about 30 Dice.

    Args:
        out: output folder (created; rerunning continues an interrupted run).
        data_dir: run on this folder of real scans instead of generated ones (read only; nothing is written into
            it). UA-MT style when it holds ``train.list`` / ``test.list`` (first ``num_labeled`` labeled, the next
            ``num_unlabeled`` unlabeled, the first ``num_test`` of ``test.list`` for the report), otherwise its
            discovered cases in order (labeled, unlabeled, and the last ``num_test`` for the report).
        format: the layout of ``data_dir`` (``uamt_h5``, ``la_raw``, ``msd_heart``, ``promise12``,
            ``msd_prostate``).
        anatomy: the kind of generated volumes, a key of :py:data:`~monai_mlbseg.data.ANATOMIES` (ignored with
            ``data_dir``).
        num_labeled: labeled (clean) volumes (default 4).
        num_unlabeled: unlabeled volumes (default 16).
        num_test: held-out test volumes (default 16).
        volume_shape: shape of the generated volumes, slices along the last axis (default 80 x 72 x 32).
        image_size: slices are resized to ``image_size`` x ``image_size`` (default 64; 144 in the reference).
        features: NestedUNet widths per level (default 8..64; 64..1024 in the reference).
        stage1_iterations: supervised iterations on the labeled slices (default 1000).
        stage2_iterations: stage-2 iterations, default 300 (1 unlabeled slice + 2 clean slices each; one optimizer
            step each with the default ``weak_to_strong``, two with ``mlbseg``).
        stage1_batch: stage-1 batch size.
        lr: SGD learning rate of both stages.
        seed: seed of the data and the training.
        device: ``"cpu"``, ``"cuda"``...; default CUDA when available.
        reuse_meta_grad: fast mode of :py:class:`~monai_mlbseg.engines.MetaTrainer` (off: the reference's clean step).
        meta_params: fast mode: restrict the meta-gradient to these parameter names or prefixes, e.g.
            ``nodes.conv0_3,final`` (all parameters by default, as in the reference).
        overrides: extra overrides of the training workflow, e.g. ``'{"train#trainer#grad_clip": 0.2}'``
            (a dict of ids to values, or the same as a JSON object as typed on the command line), merged after the
            demo's own (so they win) and named in the report's settings. The evaluation workflows do not get them.
        control: also train the labeled-only control matched to the stage-2 method, the bundle's stage-2
            workflow without unlabeled volumes and with the method's perturbation and optimizer settings (the
            registry's ``matched_control`` of the method, i.e. its strong perturbation on the labeled views, its
            clean loss and gradient clip, the same optimizer; the trainer options of ``overrides`` still apply),
            from the same stage-1 weights and for the same number of optimizer steps (twice the iterations of a
            two-step stage 2), and report it next to both stages; what the unlabeled volumes added is stage 2 against
            this control, not against stage 1.
        quick: start from the tiny sizes of :py:data:`QUICK` (for smoke tests) instead of :py:data:`SIZES`; sizes
            given explicitly still apply.
        progress: show progress bars.

    Returns:
        the path of ``report.md``.
    """
    given = {
        "num_labeled": num_labeled,
        "num_unlabeled": num_unlabeled,
        "num_test": num_test,
        "volume_shape": volume_shape,
        "image_size": image_size,
        "features": features,
        "stage1_iterations": stage1_iterations,
        "stage2_iterations": stage2_iterations,
    }
    sizes = {**(QUICK if quick else SIZES), **{k: v for k, v in given.items() if v is not None}}
    num_labeled, num_unlabeled, num_test = sizes["num_labeled"], sizes["num_unlabeled"], sizes["num_test"]
    volume_shape, image_size, features = sizes["volume_shape"], sizes["image_size"], sizes["features"]
    stage1_iterations, stage2_iterations = sizes["stage1_iterations"], sizes["stage2_iterations"]
    features = tuple(int(f) for f in features)
    extra = _parse_overrides(overrides)
    volume_shape = tuple(int(s) for s in volume_shape)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out_dir = Path(out).resolve()
    user_data = data_dir is not None
    data_dir = Path(data_dir).resolve() if user_data else out_dir / "data"
    if not user_data:
        format = "uamt_h5"
    fig_dir = out_dir / "figures"
    timings: dict[str, float] = {}
    start = time.time()

    # 1. data: the user's scans, or synthetic volumes in the UA-MT layout, split into labeled / unlabeled / test
    t0 = time.time()
    datalist_path = out_dir / "datalist.json"
    if not datalist_path.is_file():
        counts = (num_labeled, num_unlabeled, num_test)
        atomic_write_json(
            datalist_path, _demo_datalist(data_dir, format, user_data, anatomy, counts, volume_shape, seed)
        )
    datalist = load_datalist(datalist_path, data_dir)
    timings["data"] = time.time() - t0

    # 2. the left-atrium bundle, with the demo's data and sizes as overrides
    bundle = write_bundle("mlbseg_la", out_dir / "bundle")
    common = {
        "bundle_root": str(bundle),
        "dataset_dir": str(data_dir),
        "data_format": format,
        "datalist_file": str(datalist_path),
        "image_size": [image_size, image_size],
        "features": list(features),
        "device": str(dev),
    }
    train_overrides = {
        **common,
        "seed": seed,
        "lr": lr,
        "run_dir": str(out_dir),
        "ckpt_dir": str(out_dir / "models"),
        "stage1#model": str(out_dir / "models" / "stage1.pt"),
        "stage1#checkpoint_dir": str(out_dir / "checkpoints" / "stage1"),
        "train#checkpoint_dir": str(out_dir / "checkpoints" / "stage2"),
        "stage1#batch_size": stage1_batch,
        **stage_overrides(stage1_iterations, stage2_iterations),
        **trainer_overrides(
            {
                "reuse_meta_grad": reuse_meta_grad,
                "meta_params": None if meta_params is None else _as_sequence(meta_params),
            }
        ),
        "train#dataset#progress": progress,
        "train#unlabeled#dataset#progress": progress,
        **extra,
    }
    training = training_workflow(bundle, train_overrides)
    stage1, stage2 = parsed(training, "stage1#trainer"), parsed(training, "train#trainer")
    logger1 = MetricLogger(loss_transform=from_engine(["loss"], first=True))
    logger2 = MetricLogger(loss_transform=stage2_terms)
    logger1.attach(stage1)
    logger2.attach(stage2)
    keeper = _WeightMapKeeper()
    stage2.add_event_handler(MetaIterationEvents.WEIGHTS_COMPLETED, keeper)
    if progress:
        ProgressBar(desc="stage 1").attach(stage1, output_transform=from_engine(["loss"], first=True))
        ProgressBar(desc="stage 2").attach(stage2, output_transform=lambda o: {"loss": o["loss"]})

    # 3. the bundle's training, step by step; the stage-1 weights are evaluated before stage 2 starts
    for step in TRAINING_STEPS:
        t0 = time.time()
        run_training_step(training, step)
        timings[step] = time.time() - t0
        if step == "stage 1":
            report1, pred1 = _evaluate(bundle, common, out_dir / "models" / "stage1.pt", out_dir, "stage1")
        if step == "bootstrap":  # stage 2's randomness does not depend on whether stage 1 ran in this process
            reseed_stage2(training, seed)
    report2, pred2 = _evaluate(bundle, common, out_dir / "models" / "model.pt", out_dir, "stage2")
    report_control, predictions, control_info = None, {"labeled only": pred1}, None
    method = str(parsed(training, "stage2_method"))
    stage2_name = STAGE2_METHODS[method].title
    if control:
        t0 = time.time()
        control_steps = stage2_iterations * stage2.schedule.steps_per_iteration
        model, control_settings = _matched_control(bundle, train_overrides, out_dir, seed, control_steps)
        timings["control"] = time.time() - t0
        report_control, pred_control = _evaluate(bundle, common, model, out_dir, "control")
        predictions[CONTROL_NAME] = pred_control
        control_info = {
            "perturbation": _part_text(control_settings["clean_augment"]),
            "gradient clip": _part_text(control_settings["schedule"]["grad_clip"]),
            "optimizer steps": str(control_steps),
        }
    network = parsed(training, "network")
    predictions[stage2_name] = pred2
    history = logged_series(logger1, "stage 1")
    for group, names in STAGE2_CURVES.items():
        if group == "stage 2 weight shares":  # the trainer's label sources, whatever their names
            names = tuple(f"weight_{source.name}" for source in stage2.sources)
        history.update(logged_series(logger2, group, offset=stage1_iterations, select=names))

    # 4. figures and report
    load = load_volume_transforms(format, keys=("image", "label"))
    compared = (CONTROL_NAME if control else "labeled only", stage2_name)
    figures = _figures(fig_dir, datalist["test"], load, predictions, compared, keeper, history, method)
    timings["total"] = time.time() - start
    settings = {
        "data": f"{format} scans in {data_dir}"
        if user_data
        else f"synthetic ({anatomy}), {'x'.join(map(str, volume_shape))}",
        "volumes (labeled / unlabeled / test)": " / ".join(
            str(len(datalist[k])) for k in ("labeled", "unlabeled", "test")
        ),
        "slice size": f"{image_size}x{image_size}",
        "network": f"NestedUNet features {features}, {sum(p.numel() for p in network.parameters()):,} parameters",
        "iterations (stage 1 / stage 2)": f"{stage1_iterations} / {stage2_iterations}",
        "stage-2 method": method,
        "control (labeled only, same perturbation): optimizer steps": str(control_steps) if control else "not run",
        **(
            {
                "control: perturbation of the labeled views": control_info["perturbation"],
                "control: gradient clip": control_info["gradient clip"],
            }
            if control_info is not None
            else {}
        ),
        "stage-2 mode": _mode_name(reuse_meta_grad, meta_params, isinstance(stage2.weighting, MetaWeighting)),
        "extra overrides (training)": json.dumps(extra) if extra else "none",
        "learning rate": f"{lr:g}",
        "device": str(dev),
        "bundle": str(bundle),
    }
    text = _report_text(report1, report2, settings, timings, figures, user_data, method, report_control, control_info)
    atomic_write_json(out_dir / "summary.json", {"settings": settings, "wall_time_s": timings})
    report_path = atomic_write_text(out_dir / "report.md", text)
    logger.info(f"report written to {report_path}")
    print(compare_markdown(_report_rows(report1, report2, stage2_name, report_control)))
    print(f"\nreport: {report_path}")
    return str(report_path)


#: the metrics the report's prose compares: key, name, unit, scale, whether higher is better
PROSE_METRICS = (
    ("dice", "Dice", "%", 100.0, True),
    ("hd95_voxel", "95HD", "voxels", 1.0, False),
    ("asd_voxel", "ASD", "voxels", 1.0, False),
)


def _metric_change(key: str, before: SegmentationReport, after: SegmentationReport) -> tuple[str, int]:
    """
    One clause saying how the mean test ``key`` (of :py:data:`PROSE_METRICS`) changed from ``before`` to ``after``,
    and its direction: 1 better, -1 worse, 0 unchanged at the shown precision or undefined.
    """
    _, name, unit, scale, higher_is_better = next(m for m in PROSE_METRICS if m[0] == key)
    a, b = (report.summary()[key]["mean"] * scale for report in (before, after))
    if not (math.isfinite(a) and math.isfinite(b)):
        return f"{name} cannot be compared (every test case of one of the two has an empty prediction or label)", 0
    digits = 1 if unit == "%" else 2
    shown = (lambda v: f"{v:.1f}%") if unit == "%" else (lambda v: f"{v:.{digits}f} {unit}")
    if round(a, digits) == round(b, digits):
        return f"{name} did not change ({shown(b)})", 0
    better = (b > a) == higher_is_better
    if unit == "%":
        return f"{name} {'rose' if b > a else 'fell'} by {abs(b - a):.1f} points ({shown(a)} -> {shown(b)})", (
            1 if better else -1
        )
    return f"{name} {'improved' if better else 'got worse'}, from {a:.2f} to {b:.2f} {unit}", 1 if better else -1


def compare_in_words(before: SegmentationReport, after: SegmentationReport) -> str:
    """
    How the mean test Dice, 95HD and ASD (voxels) changed from ``before`` to ``after``, in one clause each, with
    their signs honestly worded: a distance that grew "got worse", and one that disagrees with Dice is introduced by
    "but".

    Args:
        before: the report compared against (e.g. the control's).
        after: the report of the method.

    Returns:
        e.g. ``"Dice rose by 1.0 points (77.1% -> 78.1%), but 95HD got worse, from 4.10 to 5.20 voxels, and ASD
        improved, from 1.30 to 1.20 voxels"``.
    """
    clauses = [_metric_change(key, before, after) for key, *_ in PROSE_METRICS]
    compared = any("cannot be compared" not in text for text, _ in clauses[1:])
    lead, texts, contrasted = clauses[0][1], [clauses[0][0]], False
    for text, sign in clauses[1:]:
        if lead and sign and sign != lead and not contrasted:
            text, contrasted = f"but {text}", True
        texts.append(text)
    text = ", ".join(texts[:-1]) + f", and {texts[-1]}"
    if compared and any(report.summary()[k]["nan_count"] for report in (before, after) for k, *_ in PROSE_METRICS[1:]):
        text += " (the distances leave out the cases where one mask is empty: see the note under the table)"
    return text


def _report_text(
    report1: SegmentationReport,
    report2: SegmentationReport,
    settings: dict[str, str],
    timings: dict[str, float],
    figures: dict[str, str],
    user_data: bool = False,
    method: str = "mlbseg",
    control: SegmentationReport | None = None,
    control_info: dict[str, str] | None = None,
) -> str:
    """
    The text of ``report.md``: what ran, the metrics table, the comparisons in words (Dice, 95HD and ASD of the
    method against stage 1 and against the control), the settings, the wall times and the ``figures`` with their
    captions. ``control_info``: the control's ``perturbation``, ``gradient clip`` and ``optimizer steps``.
    """
    name, does = STAGE2_METHODS[method].title, STAGE2_METHODS[method].description
    upper = name[:1].upper() + name[1:]
    verdict = [f"**{upper} against stage 1 (labeled only):** {compare_in_words(report1, report2)}."]
    if control is not None:
        verdict += [
            "",
            f"**{upper} against the control ({CONTROL_NAME}), what the unlabeled volumes added:** "
            f"{compare_in_words(control, report2)}.",
            "",
            f"**The control against stage 1 (more steps on the labeled volumes alone):** "
            f"{compare_in_words(report1, control)}.",
        ]
    info = control_info or {}
    perturbation = info.get("perturbation", "none")
    perturbed = (
        f"the same strong perturbation of the labeled views as {name}'s student sees ({perturbation})"
        if perturbation != "none"
        else f"the same (no) perturbation of the labeled views as {name}"
    )
    source = (
        "The scans of the folder named under Settings"
        if user_data
        else "Synthetic left-atrium-like MRI volumes (UA-MT HDF5 layout)"
    )
    lines = [
        "# MLB-Seg demo report",
        "",
        f"{source}, few labeled, more unlabeled, a held-out test set. Stage 1 trains on the labeled slices only; "
        f"stage 2 ({name}) starts from it: {does} "
        "Both run as the left-atrium bundle's training workflow (`bundle/`), and "
        "the bundle's evaluation workflow measures both on the test volumes: per volume (3D), in "
        "`metrics_stage1.csv` and `metrics_stage2.csv` (the masks in `eval_stage1/` and `eval_stage2/`)."
        + (
            f" The control ({CONTROL_NAME}) is labeled-only training matched to {name}: stage 2's workflow from the "
            f"same stage-1 weights on the labeled volumes alone, with {perturbed}, the same optimizer (SGD, "
            f"learning rate {settings.get('learning rate', '?')}), the same gradient clip "
            f"({info.get('gradient clip', 'none')}), the same clean loss and the same number of optimizer steps "
            f"({info.get('optimizer steps', '?')}); only the unlabeled volumes differ, so {name} against the control "
            "is what they added (`metrics_control.csv`, `eval_control/`)."
            if control is not None
            else ""
        ),
        "",
        "## Test metrics",
        "",
        compare_markdown(_report_rows(report1, report2, name, control)),
        "",
        *verdict,
        "",
        "Dice: higher is better; 95HD (the 95th percentile of the surface distance) and ASD (the average surface "
        "distance), in voxels: lower is better.",
        "",
        "## Settings",
        "",
        "| setting | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in settings.items()],
        "",
        "## Wall time",
        "",
        "| step | seconds |",
        "|---|---|",
        *[f"| {k} | {v:.0f} |" for k, v in timings.items()],
        "",
        "## Figures",
        "",
    ]
    for figure, caption in figures.items():
        lines += [f"![{figure}](figures/{figure})", "", caption, ""]
    return "\n".join(lines)
