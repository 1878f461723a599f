"""The demo's report: its figures and an object that writes ``report.md`` and ``summary.json``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from monai_mlbseg.engines import STAGE2_METHODS, WeightMapKeeper
from monai_mlbseg.evaluation import SegmentationReport, compare_in_words, compare_markdown, most_different_slices
from monai_mlbseg.utils import atomic_write_json, atomic_write_text
from monai_mlbseg.visualize import save_overlays, save_training_curves, save_weight_maps

__all__ = ["CONTROL_NAME", "DemoReport", "demo_figures", "part_text", "weight_map_figure"]

#: the report's name of the control: labeled-only training matched to the demonstrated method
CONTROL_NAME = "labeled only, same perturbation"


def part_text(described: Any) -> str:
    """A part described by :py:func:`~monai_mlbseg.utils.describe_settings` as ``Class(arg=value, ...)``."""
    if isinstance(described, dict) and "_target_" in described:
        args = ", ".join(f"{k}={part_text(v)}" for k, v in described.items() if k != "_target_")
        return f"{str(described['_target_']).rsplit('.', 1)[-1]}({args})"
    return "none" if described is None else str(described)


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


def weight_map_figure(path: Path, keeper: WeightMapKeeper, method: str) -> str | None:
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


def demo_figures(
    fig_dir: Path,
    test_items: list[dict],
    load: Any,
    predictions: dict[str, dict[str, np.ndarray]],
    compared: tuple[str, str],
    keeper: WeightMapKeeper,
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
    caption = weight_map_figure(fig_dir / "weight_maps.png", keeper, method)
    if caption is not None:  # a method without label sources has no weight maps
        figures["weight_maps.png"] = caption
    if history:
        save_training_curves(fig_dir / "training_curves.png", history, title="MLB-Seg demo", smooth=25)
        figures["training_curves.png"] = "Training curves of both stages."
    return figures


@dataclass
class DemoReport:
    """
    What a demo run measured, and its ``report.md``: the test metrics of stage 1, stage 2 and the matched control,
    the comparisons in words (Dice, 95HD and ASD of the method against stage 1 and against the control), the
    settings, the wall times and the figures with their captions.

    Attributes:
        method: the stage-2 method's name (a key of :py:data:`~monai_mlbseg.engines.STAGE2_METHODS`).
        stage1: the test metrics of the stage-1 weights.
        stage2: those of the final weights.
        control: those of the matched labeled-only control (``None``: not run).
        control_info: the control's ``perturbation of the labeled views``, ``gradient clip`` and ``optimizer steps``.
        settings: the run's settings, as the report shows them.
        timings: wall time per step, in seconds.
        figures: figure file name -> caption.
        user_data: whether the scans were the user's.

    Example::

        path = DemoReport("weak_to_strong", report1, report2, None, None, settings, timings, figures).write(out)
    """

    method: str
    stage1: SegmentationReport
    stage2: SegmentationReport
    control: SegmentationReport | None
    control_info: dict[str, str] | None
    settings: dict[str, str]
    timings: dict[str, float]
    figures: dict[str, str]
    user_data: bool = False

    def rows(self) -> dict[str, SegmentationReport]:
        """The rows of the metrics table: stage 1, the matched labeled-only control (when run), stage 2."""
        rows = {"labeled only (stage 1)": self.stage1}
        if self.control is not None:
            rows[f"{CONTROL_NAME} (control)"] = self.control
        rows[f"{STAGE2_METHODS[self.method].title} (stage 2)"] = self.stage2
        return rows

    def table(self) -> str:
        """The metrics table in markdown."""
        return compare_markdown(self.rows())

    def markdown(self) -> str:
        """The text of ``report.md``."""
        name, does = STAGE2_METHODS[self.method].title, STAGE2_METHODS[self.method].description
        upper = name[:1].upper() + name[1:]
        verdict = [f"**{upper} against stage 1 (labeled only):** {compare_in_words(self.stage1, self.stage2)}."]
        if self.control is not None:
            verdict += [
                "",
                f"**{upper} against the control ({CONTROL_NAME}), what the unlabeled volumes added:** "
                f"{compare_in_words(self.control, self.stage2)}.",
                "",
                f"**The control against stage 1 (more steps on the labeled volumes alone):** "
                f"{compare_in_words(self.stage1, self.control)}.",
            ]
        info = self.control_info or {}
        perturbation = info.get("perturbation of the labeled views", "none")
        perturbed = (
            f"the same strong perturbation of the labeled views as {name}'s student sees ({perturbation})"
            if perturbation != "none"
            else f"the same (no) perturbation of the labeled views as {name}"
        )
        source = (
            "The scans of the folder named under Settings"
            if self.user_data
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
                f" The control ({CONTROL_NAME}) is labeled-only training matched to {name}: stage 2's workflow from "
                f"the same stage-1 weights on the labeled volumes alone, with {perturbed}, the same optimizer (SGD, "
                f"learning rate {self.settings.get('learning rate', '?')}), the same gradient clip "
                f"({info.get('gradient clip', 'none')}), the same clean loss and the same number of optimizer steps "
                f"({info.get('optimizer steps', '?')}); only the unlabeled volumes differ, so {name} against the "
                "control is what they added (`metrics_control.csv`, `eval_control/`)."
                if self.control is not None
                else ""
            ),
            "",
            "## Test metrics",
            "",
            self.table(),
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
            *[f"| {k} | {v} |" for k, v in self.settings.items()],
            "",
            "## Wall time",
            "",
            "| step | seconds |",
            "|---|---|",
            *[f"| {k} | {v:.0f} |" for k, v in self.timings.items()],
            "",
            "## Figures",
            "",
        ]
        for figure, caption in self.figures.items():
            lines += [f"![{figure}](figures/{figure})", "", caption, ""]
        return "\n".join(lines)

    def write(self, out_dir: Path) -> Path:
        """
        Write ``report.md`` and ``summary.json`` (settings, wall times, the metrics table) into ``out_dir``,
        atomically.

        Returns:
            the path of ``report.md``.
        """
        summary: dict[str, Any] = {"settings": self.settings, "wall_time_s": self.timings, "table": self.table()}
        atomic_write_json(out_dir / "summary.json", summary)
        return Path(atomic_write_text(out_dir / "report.md", self.markdown()))
