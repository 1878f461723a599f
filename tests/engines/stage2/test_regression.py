"""
The stage-2 redesign changed no training: tiny fixed-seed runs of every named method and every option give the
parameters recorded with the flag-driven trainer before it (``tests/data/stage2_checksums.json``).

The recorded ``sha256`` is of the exact bytes of every student and teacher tensor; it was reproduced bit for bit
after the redesign on the recording machine (``MLBSEG_EXACT_CHECKSUMS=1`` checks it). Other CPUs may round a kernel
differently, so by default the test compares float64 sums to 1e-6 relative, far below the change any different
update makes (the recorded runs differ from each other by 1e-3 or more).
"""

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from monai.data import DataLoader

from monai_mlbseg.engines import MetaTrainer, stage2_method
from monai_mlbseg.engines.stage2 import (
    JointStep,
    MeanTeacherTerm,
    MetaWeighting,
    PseudoLabels,
    TwoSteps,
    UniformWeighting,
    WeightedStepOnly,
)
from monai_mlbseg.experimental import (
    AgreementMetaWeighting,
    CopyPasteTerm,
    EnsembleMeanTeacherTerm,
    PerTermClippedJointStep,
    SignMetaWeighting,
    freeze_batch_norm,
)
from monai_mlbseg.losses import ConfidentPseudoLabelLoss
from monai_mlbseg.networks import NestedUNet
from monai_mlbseg.transforms import StrongIntensityAugment
from tests.helpers import corrupt, disc_samples

RECORDED = json.loads((Path(__file__).parents[2] / "fixtures" / "stage2_checksums.json").read_text(encoding="utf-8"))
AUGMENT = {"contrast": 0.25, "shift": 0.2, "noise_std": 0.08, "blur_prob": 0.5}


def _method(name, **changes):
    """A named method with some of its parts replaced, each change a function of the method's parts (fresh each run)."""

    def build():
        parts = stage2_method(name)
        return {**parts, **{k: change(parts) for k, change in changes.items()}}

    return build


def _augment(parts):
    return StrongIntensityAugment(**AUGMENT)


#: ``weak_to_strong`` as recorded (bundles 0.4.0): the teacher's confident labels as a term's loss, not yet as a label
#: source with a confidence weighting (the same weighted BCE, see ``test_trust.py``), plus that term's clean part
W2S_RECORDED = dict(
    sources=lambda p: [],
    weighting=lambda p: UniformWeighting(),
    terms=lambda p: [MeanTeacherTerm(1.0, ConfidentPseudoLabelLoss(0.95))],
)

#: run name -> (MetaTrainer arguments, unlabeled batch size or None for no unlabeled data, freeze BatchNorm)
RUNS = {
    "mlbseg": (_method("mlbseg"), 1),
    "mlbseg_reuse_meta_grad": (_method("mlbseg", schedule=lambda p: TwoSteps(reuse_meta_grad=True)), 1),
    "mlbseg_meta_params_last": (_method("mlbseg", weighting=lambda p: MetaWeighting(["nodes.conv0_1", "final"])), 1),
    "mlbseg_no_clean_step": (_method("mlbseg", schedule=lambda p: WeightedStepOnly()), 1),
    "mlbseg_joint_step": (_method("mlbseg", schedule=lambda p: JointStep()), 1),
    "mlbseg_no_ple": (_method("mlbseg", sources=lambda p: [p["sources"][0], PseudoLabels(ensemble=False)]), 1),
    "mlbseg_unlabeled_batch_2": (_method("mlbseg"), 2),
    "mean_teacher": (_method("mean_teacher"), 1),
    "weak_to_strong": (_method("weak_to_strong", **W2S_RECORDED), 1),
    "weak_to_strong_clean_augment": (_method("weak_to_strong", **W2S_RECORDED, clean_augment=_augment), 1),
    "self_training": (_method("self_training"), 1),
    "labeled_only": (_method("labeled_only"), None),
    "labeled_only_clean_augment": (_method("weak_to_strong", **W2S_RECORDED, clean_augment=_augment), None),
    "x_sign_weights": (_method("mlbseg", weighting=lambda p: SignMetaWeighting()), 1),
    "x_agreement_weights_joint": (
        _method("mlbseg", weighting=lambda p: AgreementMetaWeighting(), schedule=lambda p: JointStep()),
        1,
    ),
    "x_copy_paste": (_method("mlbseg", terms=lambda p: [*p["terms"], CopyPasteTerm(0.5)]), 1),
    "x_teacher_ensemble": (
        _method(
            "weak_to_strong",
            **{**W2S_RECORDED, "terms": lambda p: [EnsembleMeanTeacherTerm(1.0, ConfidentPseudoLabelLoss(0.95))]},
        ),
        1,
    ),
    "x_clip_per_term": (
        _method("weak_to_strong", **W2S_RECORDED, schedule=lambda p: PerTermClippedJointStep(grad_clip=0.2)),
        1,
    ),
    "x_frozen_batch_norm": (_method("mlbseg"), 1),
}


def run(name):
    """Three iterations of the recorded run ``name``; its checksums."""
    build, unlabeled_batch = RUNS[name]
    torch.manual_seed(0)
    unlabeled = corrupt(disc_samples(4, 16, seed=1))
    clean = disc_samples(4, 16, seed=2)
    net = NestedUNet(2, features=(4, 8))
    if name == "x_frozen_batch_norm":
        freeze_batch_norm(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    trainer = MetaTrainer(
        "cpu",
        max_epochs=1,
        train_data_loader=[] if unlabeled_batch is None else DataLoader(unlabeled, batch_size=unlabeled_batch),
        clean_data_loader=DataLoader(clean, batch_size=2, shuffle=False),
        network=net,
        optimizer=opt,
        epoch_length=3,
        **build(),
    )
    trainer.set_random_state(0).run()
    digest, flat = hashlib.sha256(), []
    for module in (net,) if trainer.teacher is None else (net, trainer.teacher):
        for value in module.state_dict().values():
            digest.update(value.detach().contiguous().numpy().tobytes())
            flat.append(value.detach().double().flatten())
    flat = torch.cat(flat)
    return {
        "sha256": digest.hexdigest(),
        "sum": float(flat.sum()),
        "sum_sq": float((flat**2).sum()),
        "loss": trainer.state.output["loss"],
    }


def test_every_recorded_run_is_covered():
    assert set(RUNS) == set(RECORDED)


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_the_redesigned_trainer_trains_exactly_as_before(name):
    torch.set_num_threads(1)
    got, want = run(name), RECORDED[name]
    if os.environ.get("MLBSEG_EXACT_CHECKSUMS") == "1":
        assert got["sha256"] == want["sha256"], f"{name}: parameters differ from the recorded run"
    for key in ("sum", "sum_sq", "loss"):
        assert got[key] == pytest.approx(want[key], rel=1e-6), f"{name}: {key}"
