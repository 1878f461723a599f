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
import time
from collections.abc import Sequence
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
from monai_mlbseg.engines import STAGE2_METHODS, MetaIterationEvents, MetaWeighting, load_weights, stage2_terms
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

__all__ = ["run_demo"]

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
    Keeps the weight maps of the latest stage-2 iteration whose slice shows foreground (of the latest iteration
    while none has), for the figure.
    """

    def __init__(self) -> None:
        self.maps: dict[str, torch.Tensor] | None = None
        self.foreground = False

    def __call__(self, engine: Any) -> None:
        maps = engine.state.weight_maps
        if maps is None:
            return
        foreground = bool(maps["initial"][0].sum() >= 20)
        if self.foreground and not foreground:
            return
        self.foreground |= foreground
        k = maps["num_views"]  # references only: copied to the host once, for the figure
        self.maps = {
            "views": maps["views"][:k, 0],
            "weights": maps["weights"][:k],
            "initial": maps["initial"][:k, 0],
            "pseudo": maps["pseudo"][:k, 0],
        }


#: the report's name of the labeled-only control
CONTROL_NAME = "labeled only, continued"
#: the stage-2 method the control trains with (on labeled volumes only): the registry's control
CONTROL_METHOD = "labeled_only"


def _labeled_only_control(bundle: Path, overrides: dict[str, Any], out_dir: Path, seed: int, iterations: int) -> Path:
    """
    The labeled-only control: the bundle's stage-2 workflow with no unlabeled volumes (its trainer then makes one
    clean step per iteration) and the reference's stage-2 settings (``stage2_method`` ``"labeled_only"``: L_pc and
    L_mt on the clean views, the gradient clipped at 0.2; the benchmark's control (a)), from the stage-1 weights, for
    ``iterations`` iterations, reseeded like stage 2.
    Checkpoints in ``<out_dir>/checkpoints/control`` (a rerun continues), weights in
    ``<out_dir>/models/control/model.pt``, which it returns (a finished control, whose weights exist, is not run
    again).
    """
    model = out_dir / "models" / "control" / "model.pt"
    if model.is_file():
        return model
    epoch_length, epochs = stage_length(iterations, 50)
    workflow = training_workflow(
        bundle,
        {
            **overrides,
            "stage2_method": CONTROL_METHOD,
            "train#unlabeled#source": [],
            "ckpt_dir": str(out_dir / "models" / "control"),
            "train#checkpoint_dir": str(out_dir / "checkpoints" / "control"),
            "train#trainer#max_epochs": epochs,
            "train#trainer#epoch_length": epoch_length,
        },
    )
    load_weights(parsed(workflow, "network"), out_dir / "models" / "stage1.pt")
    parsed(workflow, "train#trainer")
    reseed_stage2(workflow, seed)
    run_training_step(workflow, "stage 2")
    return model


def _report_rows(
    report1: SegmentationReport, report2: SegmentationReport, name: str, control: SegmentationReport | None
) -> dict[str, SegmentationReport]:
    """The rows of the metrics table: stage 1, the labeled-only control (when run), stage 2."""
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


def _overlay_slices(items, load, predictions: dict[str, dict[str, np.ndarray]], max_cases: int = 4):
    images, labels, preds = [], [], {name: [] for name in predictions}
    titles = []
    for item in items[:max_cases]:
        data = load(dict(item))
        label = data["label"][0].numpy()
        z = int(label.sum(axis=(0, 1)).argmax())
        images.append(data["image"][0, :, :, z].numpy())
        labels.append(label[:, :, z])
        for name in predictions:
            preds[name].append(predictions[name][item["case_id"]][:, :, z])
        titles.append(f"{item['case_id']} z={z}")
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


def _figures(
    fig_dir: Path,
    test_items: list[dict],
    load: Any,
    predictions: dict[str, dict[str, np.ndarray]],
    weight_maps: dict[str, torch.Tensor] | None,
    history: dict,
) -> list[str]:
    """The report's figures (test overlays, the weight maps of a method with a weighted term, training curves)."""
    images, labels, preds, titles = _overlay_slices(test_items, load, predictions)
    save_overlays(fig_dir / "test_overlays.png", images, labels, preds, titles=titles)
    figures = ["test_overlays.png"]
    if weight_maps is not None and weight_maps["weights"].shape[1] > 0:  # a method without a weighted term has none
        m = {key: value.cpu().numpy() for key, value in weight_maps.items()}
        save_weight_maps(fig_dir / "weight_maps.png", m["views"], m["weights"], m["initial"], m["pseudo"])
        figures.append("weight_maps.png")
    if history:
        save_training_curves(fig_dir / "training_curves.png", history, title="MLB-Seg demo", smooth=25)
        figures.append("training_curves.png")
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
        control: also train the labeled-only control, the bundle's stage-2 workflow without unlabeled volumes
            and with the reference's stage-2 settings (``stage2_method`` ``"labeled_only"``; the trainer options
            of ``overrides`` still apply), from the same stage-1 weights and for the same number of optimizer steps
            (twice the iterations of a two-step stage 2), and report it next to both stages; what the unlabeled
            volumes added is stage 2 against this control, not against stage 1.
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
    report_control, predictions = None, {"labeled only": pred1}
    if control:
        t0 = time.time()
        control_steps = stage2_iterations * stage2.schedule.steps_per_iteration
        model = _labeled_only_control(bundle, train_overrides, out_dir, seed, control_steps)
        timings["control"] = time.time() - t0
        report_control, pred_control = _evaluate(bundle, common, model, out_dir, "control")
        predictions[CONTROL_NAME] = pred_control
    network = parsed(training, "network")
    method = str(parsed(training, "stage2_method"))
    stage2_name = STAGE2_METHODS[method].title
    predictions[stage2_name] = pred2
    history = logged_series(logger1, "stage 1")
    for group, names in STAGE2_CURVES.items():
        history.update(logged_series(logger2, group, offset=stage1_iterations, select=names))

    # 4. figures and report
    load = load_volume_transforms(format, keys=("image", "label"))
    figures = _figures(fig_dir, datalist["test"], load, predictions, keeper.maps, history)
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
        "labeled-only control (iterations)": str(control_steps) if control else "not run",
        "stage-2 mode": _mode_name(reuse_meta_grad, meta_params, isinstance(stage2.weighting, MetaWeighting)),
        "extra overrides (training)": json.dumps(extra) if extra else "none",
        "learning rate": f"{lr:g}",
        "device": str(dev),
        "bundle": str(bundle),
    }
    text = _report_text(report1, report2, settings, timings, figures, user_data, method, report_control)
    atomic_write_json(out_dir / "summary.json", {"settings": settings, "wall_time_s": timings})
    report_path = atomic_write_text(out_dir / "report.md", text)
    logger.info(f"report written to {report_path}")
    print(compare_markdown(_report_rows(report1, report2, stage2_name, report_control)))
    print(f"\nreport: {report_path}")
    return str(report_path)


def _report_text(
    report1: SegmentationReport,
    report2: SegmentationReport,
    settings: dict[str, str],
    timings: dict[str, float],
    figures: list[str],
    user_data: bool = False,
    method: str = "mlbseg",
    control: SegmentationReport | None = None,
) -> str:
    d1 = report1.summary()["dice"]["mean"] * 100
    d2 = report2.summary()["dice"]["mean"] * 100
    name, does = STAGE2_METHODS[method].title, STAGE2_METHODS[method].description
    verdict = (
        f"{name} changed the mean test Dice by {d2 - d1:+.1f} points over labeled-only training "
        f"({d1:.1f}% -> {d2:.1f}%)."
    )
    if control is not None:
        dc = control.summary()["dice"]["mean"] * 100
        verdict += (
            f" Training on the labeled volumes alone for the same number of optimizer steps (the control) changed it "
            f"by {dc - d1:+.1f} ({d1:.1f}% -> {dc:.1f}%), so the unlabeled volumes added **{d2 - dc:+.1f}** points "
            f"({name} against the control)."
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
            " The control continues stage 1 in stage 2's workflow on the labeled volumes alone, with the reference's "
            "stage-2 settings (L_pc and L_mt on the clean views, the gradient clipped at 0.2), for the same number "
            "of optimizer steps (`metrics_control.csv`, `eval_control/`)."
            if control is not None
            else ""
        ),
        "",
        "## Test metrics",
        "",
        compare_markdown(_report_rows(report1, report2, name, control)),
        "",
        verdict,
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
    captions = {
        "test_overlays.png": "Test slices: ground truth (green) and prediction (red) of every row of the table.",
        "weight_maps.png": "Learned weight maps of one stage-2 iteration: the five views, their initial and pseudo "
        "labels, and the per-pixel weights of each label source.",
        "training_curves.png": "Training curves of both stages.",
    }
    for name in figures:
        lines += [f"![{name}](figures/{name})", "", captions[name], ""]
    return "\n".join(lines)
