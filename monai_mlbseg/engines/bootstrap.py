"""Stage orchestration: run a training stage once (resumable), and bootstrap initial labels for unlabeled images."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from monai.data import MetaTensor
from monai.inferers import Inferer
from torch import nn
from tqdm.auto import tqdm

from monai_mlbseg.data.writers import AtomicNibabelWriter
from monai_mlbseg.utils import InputError, unwrap_network
from monai_mlbseg.utils.io import TEMP_MARKER, digest_path, digest_problem, recorded_source, write_digest

from .checkpoint import load_weights, save_weights

__all__ = ["run_stage", "bootstrap_labels", "initial_label_items"]

logger = logging.getLogger(__name__)


def run_stage(
    trainer: Any,
    model_path: str | os.PathLike,
    network: nn.Module | None = None,
    skip_if_done: bool = True,
) -> bool:
    """
    Run a training stage and save its final weights (a plain state dict) atomically to ``model_path``.

    With ``skip_if_done`` and an existing ``model_path`` the stage is not run again; its weights are loaded into
    ``network`` instead, unless the file is damaged (its digest or a non-finite value, see
    :py:func:`~monai_mlbseg.engines.load_weights`): then the stage runs again, with a warning naming the file, and
    resumes from its newest intact checkpoint (at its end, for a finished stage) to write the weights again. An
    interrupted stage continues from its last checkpoint when the trainer carries a
    :py:class:`~monai_mlbseg.engines.ResumeFromCheckpoint` handler. Under ``torch.distributed`` only rank 0 writes,
    and all ranks wait for it.

    Args:
        trainer: a MONAI trainer (``run()``, ``network``); an empty one (no data) is skipped.
        model_path: where the final weights go.
        network: the network to save/load (default ``trainer.network``).
        skip_if_done: skip when ``model_path`` exists.

    Returns:
        whether the trainer ran.
    """
    network = network if network is not None else trainer.network
    if skip_if_done and Path(model_path).is_file():
        try:
            load_weights(network, model_path)
        except InputError as damaged:
            logger.warning(
                f"{model_path} cannot be used ({'; '.join(p.what for p in damaged.problems)}): the stage runs "
                "again from its newest intact checkpoint to write it"
            )
        else:
            logger.info(f"{model_path} exists: stage skipped, weights loaded")
            return False
    trainer.run()
    if _rank() == 0:
        save_weights(network, model_path)
        logger.info(f"stage finished at iteration {trainer.state.iteration}; weights saved to {model_path}")
    _barrier()
    return True


def initial_label_items(
    items: Sequence[dict], output_dir: str | os.PathLike, label_key: str = "label", suffix: str = ".nii.gz"
) -> list[dict]:
    """
    The unlabeled items with ``label_key`` pointing at their (future) initial label file
    ``output_dir/<case_id><suffix>``; any ground truth already under ``label_key`` moves to ``"gt"``.

    Raises:
        ValueError: when an item has no ``case_id`` or two items share one.
    """
    out, seen = [], set()
    for item in items:
        case_id = item.get("case_id")
        if not case_id:
            raise ValueError(f"unlabeled item without a case_id: {item}")
        if case_id in seen:
            raise ValueError(f"duplicate case_id among the unlabeled items: {case_id}")
        seen.add(case_id)
        new = dict(item)
        if label_key in new and "gt" not in new:
            new["gt"] = new[label_key]
        new[label_key] = str(Path(output_dir) / f"{case_id}{suffix}")
        out.append(new)
    return out


@torch.no_grad()
def bootstrap_labels(
    network: nn.Module,
    inferer: Inferer,
    items: Sequence[dict],
    load: Callable[[dict], dict],
    device: str | torch.device = "cpu",
    image_key: str = "image",
    label_key: str = "label",
    threshold: float = 0.5,
    progress: bool = True,
    postprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
    source_digest: Callable[[str], str | None] | None = None,
) -> list[dict]:
    """
    Stage-1 bootstrap: predict every unlabeled image and write the thresholded prediction as its initial label,
    to the new file named by the item's ``label_key`` (see :py:func:`initial_label_items`), with the image's
    affine. Files are written atomically, each with its content digest recorded next to it
    (:py:func:`~monai_mlbseg.utils.write_digest`), and with the digest of the image it was made from when
    ``source_digest`` gives one. An existing label is kept (a rerun continues where it stopped) unless it no longer
    matches its digest (damaged, truncated) or was made from another version of its image: then it is written
    again, with a warning naming it. The input data are never modified. Under ``torch.distributed`` every rank
    writes its share of the files (with the unwrapped network) and all ranks wait for each other.

    Args:
        network: the stage-1 network (put in eval mode for the predictions, restored afterwards).
        inferer: volume inferer (e.g. :py:class:`~monai_mlbseg.inferers.SliceResizeInferer`).
        items: unlabeled items with ``image``, ``case_id`` and the target ``label`` path.
        load: loads an item's image (``{"image": [C, *S] MetaTensor}``), e.g. the bundle's volume transforms.
        device: inference device.
        image_key, label_key: keys.
        threshold: binarisation threshold.
        progress: show a progress bar.
        postprocess: applied to every binary mask (``[1, *S]``, uint8, on the CPU) before it is written, e.g.
            ``monai.transforms.KeepLargestConnectedComponent()`` to drop the detached false positives of a
            slice-wise network; default: none (the reference writes the thresholded prediction).
        source_digest: the content digest of an image file, e.g. :py:meth:`~monai_mlbseg.utils.DataManifest.digest_of`;
            default: the images' versions are not recorded or compared.

    Returns:
        the items (unchanged), for chaining in configs.
    """
    todo = [item for item in items if _outdated(item[label_key], item[image_key], source_digest)]
    if _rank() == 0:
        for folder in {Path(item[label_key]).parent for item in todo}:
            for stale in folder.glob(f".*{TEMP_MARKER}*"):  # left by a killed write; never read by anything
                stale.unlink()
    _barrier()
    todo = todo[_rank() :: _world()]
    module = unwrap_network(network)
    was_training = module.training
    module.eval()
    try:
        for item in tqdm(todo, desc="initial labels", disable=not progress):
            data = load({k: v for k, v in item.items() if k not in (label_key, "gt")})
            image = data[image_key]
            batch = (image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image))[None].to(device)
            mask = (torch.sigmoid(inferer(batch, module)) > threshold)[0].to(torch.uint8).cpu()
            if postprocess is not None:
                mask = torch.as_tensor(postprocess(mask)).to(torch.uint8)
            affine = image.meta.get("affine", torch.eye(4)) if isinstance(image, MetaTensor) else torch.eye(4)
            writer = AtomicNibabelWriter(output_dtype=torch.uint8)
            writer.set_data_array(mask, channel_dim=0)
            writer.set_metadata({"affine": affine, "original_affine": affine}, resample=False)
            digest_path(item[label_key]).unlink(missing_ok=True)
            writer.write(item[label_key], verbose=False)
            write_digest(item[label_key], source=source_digest(item[image_key]) if source_digest else None)
    finally:
        module.train(was_training)
    _barrier()
    if todo:
        logger.info(f"wrote {len(todo)} initial labels")
    return list(items)


def _outdated(label: str, image: str, source_digest: Callable[[str], str | None] | None) -> bool:
    """Whether the initial label ``label`` of ``image`` must be written: it is missing, damaged or made from another
    version of the image (a warning names it in the last two cases)."""
    if not Path(label).is_file():
        return True
    problem = digest_problem(label)
    if problem is None and source_digest is not None:
        made_from, now = recorded_source(label), source_digest(image)
        if made_from and now and made_from != now:
            problem = f"it was made from another version of {image}"
    if problem is not None:
        logger.warning(f"initial label {label}: {problem}; it is written again")
        return True
    return False


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
