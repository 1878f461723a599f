"""The demo run: data, then the bundle's training and its matched control, then the report."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ignite.engine import Events
from ignite.handlers import ProgressBar
from monai.handlers import MetricLogger, from_engine

from monai_mlbseg.bundles import write_bundle
from monai_mlbseg.data import folder_split, load_datalist, load_volume_transforms, synthetic_split
from monai_mlbseg.engines import STAGE2_METHODS, WeightMapKeeper, stage2_terms
from monai_mlbseg.engines.stage2 import MetaWeighting
from monai_mlbseg.evaluation import SegmentationReport
from monai_mlbseg.pipeline import logged_series
from monai_mlbseg.recipe import TrainingRun, parsed, train_matched_control, training_workflow
from monai_mlbseg.utils import atomic_write_json

from .config import DemoConfig
from .report import CONTROL_NAME, DemoReport, demo_figures, part_text

__all__ = ["demo", "run_demo"]

#: panels of the training-curve figure: stage-2 series grouped by what they measure
STAGE2_CURVES = {
    "stage 2 losses": ("loss", "loss_meta", "loss_clean"),
    "stage 2 labels vs ground truth (Dice)": ("dice_initial_gt", "dice_pseudo_gt", "dice_pred_gt"),
    "stage 2 weight shares": ("weight_initial", "weight_pseudo"),
}


def _evaluate(
    bundle: Path, overrides: dict[str, Any], out_dir: Path, model: Path, name: str
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
            "metrics_dir": str(out_dir),
            "metrics_prefix": f"metrics_{name}",
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
    return parsed(workflow, "report_handler").report, predictions


def _datalist(config: DemoConfig) -> dict:
    """The run's datalist (``<out>/datalist.json``, written once): the user's scans, or generated volumes."""
    path = config.out_dir / "datalist.json"
    if not path.is_file():
        counts = (config.num_labeled, config.num_unlabeled, config.num_test)
        if config.user_data:
            datalist = folder_split(config.data_path, config.format, *counts)  # type: ignore[arg-type]
        else:
            datalist = synthetic_split(config.data_path, config.anatomy, counts, config.volume_shape, config.seed)  # type: ignore[arg-type]
        atomic_write_json(path, datalist)
    return load_datalist(path, config.data_path)


class _Monitors:
    """The loss loggers, progress bars and weight-map keeper of a training run's two stages."""

    def __init__(self, run: TrainingRun, progress: bool) -> None:
        self.stage1, self.stage2 = run.get("stage1#trainer"), run.get("train#trainer")
        self.loggers = MetricLogger(loss_transform=from_engine(["loss"], first=True)), MetricLogger(stage2_terms)
        self.loggers[0].attach(self.stage1)
        self.loggers[1].attach(self.stage2)
        self.keeper = WeightMapKeeper()
        self.keeper.attach(self.stage2)
        if progress:
            ProgressBar(desc="stage 1").attach(self.stage1, output_transform=from_engine(["loss"], first=True))
            ProgressBar(desc="stage 2").attach(self.stage2, output_transform=lambda o: {"loss": o["loss"]})

    def history(self, offset: int) -> dict:
        """The training curves: stage 1's loss, then stage 2's series (from iteration ``offset``) by group."""
        history = logged_series(self.loggers[0], "stage 1")
        for group, names in STAGE2_CURVES.items():
            if group == "stage 2 weight shares":  # the trainer's label sources, whatever their names
                names = tuple(f"weight_{source.name}" for source in self.stage2.sources)
            history.update(logged_series(self.loggers[1], group, offset=offset, select=names))
        return history


def _mode_name(trainer: Any) -> str:
    """The stage-2 mode for the report: MLB-Seg's fast modes, or that a method has no meta step."""
    if not isinstance(trainer.weighting, MetaWeighting):
        return "no meta step"
    parts = ["reuse_meta_grad"] if getattr(trainer.schedule, "reuse_meta_grad", False) else []
    if trainer.weighting.meta_params is not None:
        parts.append(f"meta_params={'+'.join(trainer.weighting.meta_params)}")
    return ", ".join(parts) if parts else "faithful (reference)"


def _settings(config: DemoConfig, datalist: dict, run: TrainingRun, control: dict[str, str] | None) -> dict[str, str]:
    """The run's settings as the report shows them."""
    network, method, trainer = run.get("network"), str(run.get("stage2_method")), run.get("train#trainer")
    data = f"synthetic ({config.anatomy}), {'x'.join(map(str, config.volume_shape))}"  # type: ignore[arg-type]
    return {
        "data": f"{config.format} scans in {config.data_path}" if config.user_data else data,
        "volumes (labeled / unlabeled / test)": " / ".join(
            str(len(datalist[k])) for k in ("labeled", "unlabeled", "test")
        ),
        "slice size": f"{config.image_size}x{config.image_size}",
        "network": f"NestedUNet features {config.features}, {sum(p.numel() for p in network.parameters()):,} "
        "parameters",
        "stage-1 iterations / stage-2 optimizer steps": f"{config.stage1_iterations} / {config.stage2_steps}",
        "stage-2 method": method,
        "control (labeled only, same perturbation): optimizer steps": control["optimizer steps"]
        if control
        else "not run",
        **(
            {f"control: {k}": control[k] for k in ("perturbation of the labeled views", "gradient clip")}
            if control
            else {}
        ),
        "stage-2 mode": _mode_name(trainer),
        "extra overrides (training)": config.user_overrides_text(),
        "learning rate": f"{config.lr:g}",
        "device": str(config.torch_device),
        "bundle": str(config.out_dir / "bundle"),
    }


def _control(
    config: DemoConfig, bundle: Path, evaluate: Callable[[Path, str], tuple[SegmentationReport, dict]]
) -> tuple[tuple[SegmentationReport, dict], dict[str, str]]:
    """The matched labeled-only control trained (:py:func:`~monai_mlbseg.recipe.train_matched_control`), its test
    evaluation and what the report says of it."""
    out = config.out_dir
    model, settings = train_matched_control(
        bundle,
        config.training_overrides(bundle),
        out / "stage1.pt",
        out / "models" / "control",
        config.seed,
        config.user_overrides,
    )
    info = {
        "perturbation of the labeled views": part_text(settings["clean_augment"]),
        "gradient clip": part_text(settings["schedule"]["grad_clip"]),
        "optimizer steps": str(config.stage2_steps),
    }
    return evaluate(model, "control"), info


def run_demo(config: DemoConfig | None = None, **options: Any) -> Path:
    """
    Run the demo of ``config`` (or of ``options``, the arguments of :py:func:`demo`): its data, the left-atrium
    bundle's training step by step with its evaluation after stage 1 and stage 2, the labeled-only control matched to
    the method, then the report.

    Returns:
        the path of ``report.md``.

    Raises:
        InputError: for bad options or data, before any training.

    Example::

        run_demo(DemoConfig(out="demo", quick=True))
    """
    config = config if config is not None else DemoConfig(**options)
    out, start = config.out_dir, time.perf_counter()
    datalist = _datalist(config)
    timings = {"data": time.perf_counter() - start}
    bundle = write_bundle("mlbseg_la", out / "bundle")
    run = TrainingRun(bundle, config.training_overrides(bundle), config.seed, config.user_overrides)
    monitors = _Monitors(run, config.progress)
    evaluate = functools.partial(_evaluate, bundle, config.data_overrides(bundle), out)
    results = {}
    run.run(
        after=lambda step: step == "stage 1" and results.update({"labeled only": evaluate(out / "stage1.pt", "stage1")})
    )
    method = str(run.get("stage2_method"))
    title = STAGE2_METHODS[method].title
    results[title] = evaluate(out / "models" / "model.pt", "stage2")
    timings.update(run.timings)
    control = None
    if config.control:
        results[CONTROL_NAME], control = _control(config, bundle, evaluate)
        timings["control"] = time.perf_counter() - start - sum(timings.values())
    compared = (CONTROL_NAME if config.control else "labeled only", title)
    predictions = {name: result[1] for name, result in results.items()}
    load = load_volume_transforms(config.format, keys=("image", "label"))
    history = monitors.history(offset=int(config.stage1_iterations))  # type: ignore[arg-type]
    figures = demo_figures(
        out / "figures", datalist["test"], load, predictions, compared, monitors.keeper, history, method
    )
    timings["total"] = time.perf_counter() - start
    reports = {name: result[0] for name, result in results.items()}
    report = DemoReport(
        method,
        reports["labeled only"],
        reports[title],
        reports.get(CONTROL_NAME),
        control,
        _settings(config, datalist, run, control),
        timings,
        figures,
        config.user_data,
    )
    return report.write(out)


def demo(
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
    stage2_steps: int | None = None,
    stage1_batch: int = 4,
    lr: float = 0.01,
    seed: int = 0,
    device: str | None = None,
    overrides: dict[str, Any] | str | None = None,
    control: bool = True,
    quick: bool = False,
    progress: bool = True,
) -> Path:
    """
    Run the left-atrium bundle end to end on synthetic left-atrium-like MRI and write a report (the
    ``python -m monai_mlbseg demo`` command; :py:class:`DemoConfig` holds these options and :py:func:`run_demo` runs
    them).

    The bundle is written to ``<out>/bundle`` and run with overrides (data folder and datalist, sizes, iterations,
    learning rate, seed, device; stage-1 weights, initial labels and checkpoints under ``out``, the final weights in
    ``<out>/models``); stage 2 is reseeded, so that its randomness does not depend on whether stage 1 ran in this
    process. Both stages are evaluated by the bundle's evaluation workflow (masks in ``<out>/eval_stage1`` and
    ``<out>/eval_stage2``, metrics in ``<out>/metrics_stage1.csv`` / ``.json`` and ``metrics_stage2``). Every size
    is an option (e.g. ``--features 16,32,64,128,256 --image_size 144 --stage2_steps 3000`` on a GPU). The
    method's settings are the bundle's (its ``stage2_method`` and the method's parts, SGD momentum 0.9, weight decay
    5e-4) except the learning rate, larger here for the short schedule; ``overrides`` changes any other id of the
    training workflow (e.g. ``{"stage2_options": {"grad_clip": 0.2}}``). The report names the method and describes
    it from :py:data:`~monai_mlbseg.engines.STAGE2_METHODS`; the README gives the measured results.

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
        stage2_steps: stage-2 optimizer steps, default 300 (the bundle's ``stage2_steps``: one iteration, 1 unlabeled
            slice + 2 clean slices, per step with the default ``weak_to_strong``, per two with ``mlbseg``).
        stage1_batch: stage-1 batch size.
        lr: SGD learning rate of both stages.
        seed: seed of the data and the training.
        device: ``"cpu"``, ``"cuda"``...; default CUDA when available.
        overrides: extra overrides of the training workflow, e.g. ``'{"stage2_options": {"grad_clip": 0.2}}'``
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

    Raises:
        InputError: for bad options or data, before any training.
    """
    return run_demo(DemoConfig(**{name: value for name, value in locals().items() if name in DemoConfig.options()}))
