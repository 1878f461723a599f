"""
``python -m monai_mlbseg demo``: the whole method on a generated left-atrium-like data set, on a laptop CPU.

It writes synthetic volumes in the UA-MT HDF5 layout (the real loaders read them), trains stage 1 on the few labeled
volumes, bootstraps initial labels for the unlabeled ones, trains stage 2 (MLB-Seg), evaluates both stages on
held-out volumes, and writes metrics, figures and a ``report.md``. Every step is resumable: rerunning the same
command after an interruption continues where it stopped.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.handlers import ProgressBar
from monai.data import DataLoader
from monai.engines import SupervisedTrainer
from monai.handlers import LrScheduleHandler, MetricLogger, from_engine
from monai.utils import set_determinism

from monai_mlbseg.data import (
    SliceDataset,
    build_datalist,
    get_format,
    load_datalist,
    load_volume_transforms,
    make_synthetic_dataset,
    read_case_list,
)
from monai_mlbseg.engines import (
    AtomicCheckpointSaver,
    MetaIterationEvents,
    MetaTrainer,
    NonFiniteLossGuard,
    ResumeFromCheckpoint,
    bootstrap_labels,
    initial_label_items,
    run_stage,
    stage2_terms,
)
from monai_mlbseg.evaluation import SegmentationReport, compare_markdown, spacing_from_affine
from monai_mlbseg.inferers import SliceResizeInferer
from monai_mlbseg.networks import NestedUNet
from monai_mlbseg.pipeline import logged_series, slice_augmentation, slice_preprocessing
from monai_mlbseg.utils import InputError, Problem, atomic_write_json, atomic_write_text
from monai_mlbseg.visualize import save_overlays, save_training_curves, save_weight_maps

__all__ = ["run_demo"]

logger = logging.getLogger("monai_mlbseg.demo")

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


def _mode_name(reuse_meta_grad: bool, meta_params: str | Sequence[str] | None) -> str:
    """Human-readable name of the stage-2 mode for the report."""
    parts = (["reuse_meta_grad"] if reuse_meta_grad else []) + (
        [f"meta_params={'+'.join(map(str, _as_sequence(meta_params)))}"] if meta_params is not None else []
    )
    return ", ".join(parts) if parts else "faithful (reference)"


def _stage_settings(iterations: int, chunk: int) -> tuple[int, int]:
    """``(epoch_length, max_epochs)`` giving exactly ``iterations`` iterations in epochs of at most ``chunk``."""
    epoch_length = max(1, min(chunk, iterations))
    return epoch_length, math.ceil(iterations / epoch_length)


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


def _evaluate(network, inferer, items, load, device, name: str) -> tuple[SegmentationReport, dict[str, np.ndarray]]:
    report = SegmentationReport()
    predictions = {}
    network.eval()
    with torch.no_grad():
        for item in items:
            data = load(dict(item))
            image, label = data["image"], data["label"]
            logits = inferer(image.as_tensor()[None].to(device), network)
            pred = (torch.sigmoid(logits) > 0.5)[0, 0].cpu()
            spacing = spacing_from_affine(image.affine, 3)
            report.add(item["case_id"], pred, label[0], spacing=spacing, method=name)
            predictions[item["case_id"]] = pred.numpy()
    network.train()
    return report, predictions


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


def run_demo(
    out: str = "mlbseg_demo",
    data_dir: str | None = None,
    format: str = "uamt_h5",
    num_labeled: int = 4,
    num_unlabeled: int = 16,
    num_test: int = 6,
    volume_shape: Sequence[int] = (80, 72, 32),
    image_size: int = 64,
    features: Sequence[int] = (8, 16, 32, 64),
    stage1_iterations: int = 400,
    stage2_iterations: int = 300,
    stage1_batch: int = 4,
    lr: float = 0.01,
    seed: int = 0,
    device: str | None = None,
    reuse_meta_grad: bool = False,
    meta_params: str | Sequence[str] | None = None,
    quick: bool = False,
    progress: bool = True,
) -> str:
    """
    Run MLB-Seg end to end on synthetic left-atrium-like MRI and write a report.

    The defaults finish in a few minutes on 2 CPU cores; every size is an option (e.g. ``--features 16,32,64,128,256
    --image_size 144 --stage2_iterations 3000`` on a GPU). The method's settings are the reference's (views, losses,
    look-ahead, EMA 0.99, clip 0.2, SGD momentum 0.9, weight decay 5e-4) except the learning rate, larger here for
    the short schedule.

    Args:
        out: output folder (created; rerunning continues an interrupted run).
        data_dir: run on this folder of real scans instead of generated ones (read only; nothing is written into
            it): UA-MT style when it holds ``train.list`` / ``test.list`` (first ``num_labeled`` labeled, the next
            ``num_unlabeled`` unlabeled, the first ``num_test`` of ``test.list`` for the report), otherwise its
            discovered cases in order (labeled, unlabeled, and the last ``num_test`` for the report).
        format: the layout of ``data_dir`` (``uamt_h5``, ``la_raw``, ``msd_heart``, ``promise12``,
            ``msd_prostate``).
        num_labeled: labeled (clean) volumes.
        num_unlabeled: unlabeled volumes.
        num_test: held-out test volumes.
        volume_shape: shape of the generated volumes (slices along the last axis).
        image_size: slices are resized to ``image_size`` x ``image_size`` (144 in the reference).
        features: NestedUNet widths per level (64..1024 in the reference).
        stage1_iterations: supervised iterations on the labeled slices.
        stage2_iterations: MLB-Seg iterations (1 unlabeled slice + 2 clean slices each).
        stage1_batch: stage-1 batch size.
        lr: SGD learning rate of both stages.
        seed: seed of the data and the training.
        device: ``"cpu"``, ``"cuda"``...; default CUDA when available.
        reuse_meta_grad: fast mode of :py:class:`~monai_mlbseg.engines.MetaTrainer` (off: the reference's clean step).
        meta_params: fast mode: restrict the meta-gradient to these parameter names or prefixes, e.g.
            ``nodes.conv0_3,final`` (default: all parameters, as in the reference).
        quick: a tiny configuration for smoke tests (overrides the sizes).
        progress: show progress bars.

    Returns:
        the path of ``report.md``.
    """
    if quick:
        num_labeled, num_unlabeled, num_test = QUICK["num_labeled"], QUICK["num_unlabeled"], QUICK["num_test"]
        volume_shape, image_size, features = QUICK["volume_shape"], QUICK["image_size"], QUICK["features"]
        stage1_iterations, stage2_iterations = QUICK["stage1_iterations"], QUICK["stage2_iterations"]
    features = tuple(int(f) for f in features)
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
    set_determinism(seed=seed)

    # 1. data: synthetic volumes in the UA-MT layout, split into labeled / unlabeled / test
    t0 = time.time()
    datalist_path = out_dir / "datalist.json"
    if not datalist_path.is_file() and user_data:
        logger.info(f"using the {format} scans in {data_dir}")
        atomic_write_json(datalist_path, _user_datalist(data_dir, format, num_labeled, num_unlabeled, num_test))
    elif not datalist_path.is_file():
        total = num_labeled + num_unlabeled + num_test
        logger.info(f"generating {total} synthetic volumes {volume_shape} in {data_dir}")
        ids = make_synthetic_dataset(data_dir, "uamt_h5", num_cases=total, shape=volume_shape, seed=seed)
        datalist = build_datalist(
            data_dir,
            "uamt_h5",
            labeled=ids[:num_labeled],
            unlabeled=ids[num_labeled : num_labeled + num_unlabeled],
            test=ids[num_labeled + num_unlabeled :],
        )
        atomic_write_json(datalist_path, datalist)
    datalist = load_datalist(datalist_path, data_dir)
    timings["data"] = time.time() - t0

    load = load_volume_transforms(format, keys=("image", "label", "gt"))
    prep = slice_preprocessing((image_size, image_size))
    augment = slice_augmentation()
    inferer = SliceResizeInferer(roi_size=(image_size, image_size), sw_batch_size=64)
    network = NestedUNet(2, 1, 1, features=features).to(dev)
    history: dict[str, list[tuple[int, float]]] = {}

    # 2. stage 1: supervised training on the labeled slices
    t0 = time.time()
    clean = SliceDataset(datalist["labeled"], load, prep, augment, progress=progress)
    epoch_length, epochs = _stage_settings(stage1_iterations, 50)
    opt1 = torch.optim.SGD(network.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    save1 = {"network": network, "optimizer": opt1}
    logger1 = MetricLogger(loss_transform=from_engine(["loss"], first=True))
    stage1 = SupervisedTrainer(
        device=dev,
        max_epochs=epochs,
        epoch_length=epoch_length,
        train_data_loader=DataLoader(clean, batch_size=stage1_batch, shuffle=True, drop_last=len(clean) > stage1_batch),
        network=network,
        optimizer=opt1,
        loss_function=torch.nn.BCEWithLogitsLoss(),
        train_handlers=[ResumeFromCheckpoint(out_dir / "checkpoints" / "stage1", save1), NonFiniteLossGuard(), logger1],
    )
    AtomicCheckpointSaver(
        str(out_dir / "checkpoints" / "stage1"), save1, save_interval=50, epoch_level=False, n_saved=1, save_final=True
    ).attach(stage1)
    if progress:
        ProgressBar(desc="stage 1").attach(stage1, output_transform=from_engine(["loss"], first=True))
    run_stage(stage1, out_dir / "models" / "stage1.pt")
    history.update(logged_series(logger1, "stage 1"))
    timings["stage 1"] = time.time() - t0

    report1, pred1 = _evaluate(network, inferer, datalist["test"], load, dev, "labeled only (stage 1)")
    report1.write(out_dir, "metrics_stage1")

    # 3. bootstrap: initial labels of the unlabeled volumes, written as new files
    t0 = time.time()
    unlabeled = initial_label_items(datalist["unlabeled"], out_dir / "initial_labels")
    bootstrap_labels(network, inferer, unlabeled, load, device=dev, progress=progress)
    atomic_write_json(out_dir / "datalist_stage2.json", {**datalist, "unlabeled": unlabeled})
    timings["bootstrap"] = time.time() - t0

    # 4. stage 2: MLB-Seg; reseeded so that its randomness does not depend on whether stage 1 ran in this process
    t0 = time.time()
    set_determinism(seed=seed + 1)
    unlabeled_ds = SliceDataset(unlabeled, load, prep, augment, progress=progress)
    epoch_length, epochs = _stage_settings(stage2_iterations, 50)
    opt2 = torch.optim.SGD(network.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt2, lambda e: 20.0 / (e + 20.0))
    teacher = NestedUNet(2, 1, 1, features=features).to(dev)
    save2 = {"network": network, "teacher": teacher, "optimizer": opt2, "lr_scheduler": sched}
    logger2 = MetricLogger(loss_transform=stage2_terms)
    stage2 = MetaTrainer(
        device=dev,
        max_epochs=epochs,
        epoch_length=epoch_length,
        train_data_loader=DataLoader(unlabeled_ds, batch_size=1, shuffle=True),
        clean_data_loader=DataLoader(clean, batch_size=2, shuffle=True, drop_last=True),
        network=network,
        optimizer=opt2,
        teacher=teacher,
        reuse_meta_grad=reuse_meta_grad,
        meta_params=None if meta_params is None else [str(m) for m in _as_sequence(meta_params)],
        train_handlers=[
            ResumeFromCheckpoint(out_dir / "checkpoints" / "stage2", save2),
            LrScheduleHandler(sched, print_lr=False),
            logger2,
        ],
    )
    stage2.set_random_state(seed)
    AtomicCheckpointSaver(
        str(out_dir / "checkpoints" / "stage2"), save2, save_interval=50, epoch_level=False, n_saved=1, save_final=True
    ).attach(stage2)
    keeper = _WeightMapKeeper()
    stage2.add_event_handler(MetaIterationEvents.WEIGHTS_COMPLETED, keeper)
    if progress:
        ProgressBar(desc="stage 2").attach(stage2, output_transform=lambda o: {"loss": o["loss"]})
    run_stage(stage2, out_dir / "models" / "model.pt", skip_if_done=False)
    for group, names in STAGE2_CURVES.items():
        history.update(logged_series(logger2, group, offset=stage1_iterations, select=names))
    timings["stage 2"] = time.time() - t0

    report2, pred2 = _evaluate(network, inferer, datalist["test"], load, dev, "MLB-Seg (stage 2)")
    report2.write(out_dir, "metrics_stage2")

    # 5. figures and report
    images, labels, preds, titles = _overlay_slices(datalist["test"], load, {"labeled only": pred1, "MLB-Seg": pred2})
    save_overlays(fig_dir / "test_overlays.png", images, labels, preds, titles=titles)
    figures = ["test_overlays.png"]
    if keeper.maps is not None:
        m = {key: value.cpu().numpy() for key, value in keeper.maps.items()}
        save_weight_maps(fig_dir / "weight_maps.png", m["views"], m["weights"], m["initial"], m["pseudo"])
        figures.append("weight_maps.png")
    if history:
        save_training_curves(fig_dir / "training_curves.png", history, title="MLB-Seg demo", smooth=25)
        figures.append("training_curves.png")
    timings["total"] = time.time() - start
    settings = {
        "data": f"{format} scans in {data_dir}" if user_data else f"synthetic, {'x'.join(map(str, volume_shape))}",
        "volumes (labeled / unlabeled / test)": " / ".join(
            str(len(datalist[k])) for k in ("labeled", "unlabeled", "test")
        ),
        "slice size": f"{image_size}x{image_size}",
        "network": f"NestedUNet features {features}, {sum(p.numel() for p in network.parameters()):,} parameters",
        "iterations (stage 1 / stage 2)": f"{stage1_iterations} / {stage2_iterations}",
        "stage-2 mode": _mode_name(reuse_meta_grad, meta_params),
        "device": str(dev),
    }
    text = _report_text(report1, report2, settings, timings, figures, user_data)
    atomic_write_json(out_dir / "summary.json", {"settings": settings, "wall_time_s": timings})
    report_path = atomic_write_text(out_dir / "report.md", text)
    logger.info(f"report written to {report_path}")
    print(compare_markdown({"labeled only (stage 1)": report1, "MLB-Seg (stage 2)": report2}))
    print(f"\nreport: {report_path}")
    return str(report_path)


def _report_text(
    report1: SegmentationReport,
    report2: SegmentationReport,
    settings: dict[str, str],
    timings: dict[str, float],
    figures: list[str],
    user_data: bool = False,
) -> str:
    d1 = report1.summary()["dice"]["mean"] * 100
    d2 = report2.summary()["dice"]["mean"] * 100
    verdict = (
        f"MLB-Seg changed the mean test Dice by {d2 - d1:+.1f} points over labeled-only training "
        f"({d1:.1f}% -> {d2:.1f}%)."
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
        "stage 2 (MLB-Seg) starts from it and learns per-pixel weights for the initial labels and the PLE pseudo "
        "labels of the unlabeled slices. Metrics are per test volume (3D), from `metrics_stage1.csv` and "
        "`metrics_stage2.csv`.",
        "",
        "## Test metrics",
        "",
        compare_markdown({"labeled only (stage 1)": report1, "MLB-Seg (stage 2)": report2}),
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
        "test_overlays.png": "Test slices: ground truth (green) and prediction (red) for both stages.",
        "weight_maps.png": "Learned weight maps of one stage-2 iteration: the five views, their initial and pseudo "
        "labels, and the per-pixel weights of each label source.",
        "training_curves.png": "Training curves of both stages.",
    }
    for name in figures:
        lines += [f"![{name}](figures/{name})", "", captions[name], ""]
    return "\n".join(lines)
