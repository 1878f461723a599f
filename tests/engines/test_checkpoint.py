import json

import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader
from monai.handlers import LrScheduleHandler

from monai_mlbseg.engines import (
    AtomicCheckpointSaver,
    MetaTrainer,
    ResumeFromCheckpoint,
    latest_checkpoint,
    load_weights,
    run_stage,
    save_weights,
    stage2_method,
)
from monai_mlbseg.engines.stage2 import MeanTeacherTerm
from monai_mlbseg.experimental import AmortisedMetaWeighting
from monai_mlbseg.losses import ConfidentPseudoLabelLoss
from monai_mlbseg.networks import NestedUNet
from monai_mlbseg.transforms import StrongIntensityAugment
from monai_mlbseg.utils import InputError
from tests.helpers import corrupt, disc_samples


def build(ckpt_dir, epochs=2, stop_at=None, seed=0, method="mlbseg", **parts):
    """A stage-2 trainer of ``method`` (``parts`` replace its parts) that checkpoints every 2 iterations and resumes
    from ckpt_dir, as the bundles do."""
    torch.manual_seed(seed)
    net = NestedUNet(2, features=(4, 8))
    teacher = NestedUNet(2, features=(4, 8))
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 20 / (e + 20))
    save_dict = {"network": net, "teacher": teacher, "optimizer": opt, "lr_scheduler": sched}
    handlers = [ResumeFromCheckpoint(ckpt_dir, save_dict), LrScheduleHandler(sched, print_lr=False)]
    trainer = MetaTrainer(
        "cpu",
        epochs,
        DataLoader(corrupt(disc_samples(5, 16, seed=1)), batch_size=1, shuffle=True),
        DataLoader(disc_samples(4, 16, seed=2), batch_size=2, shuffle=True),
        net,
        opt,
        train_handlers=handlers,
        **stage2_method(method, teacher, **parts),
    )
    AtomicCheckpointSaver(
        str(ckpt_dir), save_dict, save_interval=2, epoch_level=False, n_saved=1, save_final=True
    ).attach(trainer)
    if stop_at is not None:
        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=stop_at), lambda e: e.terminate())
    return trainer, net, teacher, opt, sched


def test_interrupted_and_resumed_run_finishes_the_planned_iterations(tmp_path):
    trainer, *_ = build(tmp_path, stop_at=7)
    trainer.run()
    assert trainer.state.iteration == 7
    # a terminated run (unlike a killed one) completes and saves its state as the final checkpoint
    assert latest_checkpoint(tmp_path).name == "checkpoint_final_iteration=7.pt"
    saved_teacher = torch.load(latest_checkpoint(tmp_path), weights_only=True)["teacher"]

    resumed, net, teacher, opt, sched = build(tmp_path, seed=123)
    started = {}
    resumed.add_event_handler(Events.STARTED, lambda e: started.update(iteration=e.state.iteration))
    resumed.add_event_handler(
        Events.ITERATION_STARTED(once=8),
        lambda e: started.update(teacher={k: v.clone() for k, v in teacher.state_dict().items()}),
    )
    resumed.run()
    assert started["iteration"] == 7, "resumed from the checkpoint of iteration 7"
    assert all(torch.equal(saved_teacher[k], v) for k, v in started["teacher"].items()), (
        "teacher restored, not re-copied"
    )
    assert resumed.state.iteration == 10 and resumed.state.epoch == 2
    assert sched.last_epoch == 2 and opt.param_groups[0]["lr"] == pytest.approx(0.05 * 20 / 22)
    final = latest_checkpoint(tmp_path)
    assert "final_iteration=10" in final.name
    state = torch.load(final, weights_only=True)
    assert set(state) == {"network", "teacher", "optimizer", "lr_scheduler", "trainer"}
    assert state["trainer"]["iteration"] == 10
    fresh = NestedUNet(2, features=(4, 8))
    load_weights(fresh, final)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), net.state_dict().values()))


def confident_terms(threshold):
    return {"terms": [MeanTeacherTerm(1.0, ConfidentPseudoLabelLoss(threshold))]}


def test_a_resume_with_other_stage2_settings_is_refused_before_training(tmp_path):
    strong = {"method": "weak_to_strong", "student_augment": StrongIntensityAugment(), **confident_terms(0.95)}
    trainer, *_ = build(tmp_path, stop_at=3, **strong)
    trainer.run()
    recorded = json.loads((tmp_path / ResumeFromCheckpoint.settings_file).read_text())
    confident = recorded["terms"][0]["loss"]
    assert confident["_target_"].endswith(".ConfidentPseudoLabelLoss") and confident["threshold"] == 0.95
    assert recorded["student_augment"]["contrast"] == 0.25
    assert recorded == trainer.run_settings and recorded["supervised_only"] is False
    assert recorded["views"]["zoom_in_range"] == list(trainer.views.zoom_in_range), "the views are a setting too"

    again, *_ = build(tmp_path, **strong)  # the same settings (and a new random state): resumes and finishes
    again.run()
    assert again.state.iteration == 2 * 5

    # the message names each setting that differs as "<key>: <recorded> there, <current> now"
    lower = [{**recorded["terms"][0], "loss": {**confident, "threshold": 0.9}}]
    cases = [
        ({**strong, **confident_terms(0.9)}, f"(terms: {recorded['terms']!r} there, {lower!r} now)"),
        ({**strong, "student_augment": StrongIntensityAugment(contrast=0.3)}, "student_augment: "),
        ({}, "student_augment: {"),  # MLB-Seg's defaults: no perturbation, no threshold
    ]
    for options, detail in cases:
        other, net, *_ = build(tmp_path, **options)
        before = {k: v.clone() for k, v in net.state_dict().items()}
        with pytest.raises(InputError, match="other settings") as error:
            other.run()
        assert str(tmp_path) in str(error.value) and detail in str(error.value)
        assert other.state.iteration == 0
        assert all(torch.equal(before[k], v) for k, v in net.state_dict().items()), "nothing was loaded or trained"


def test_checkpoints_without_recorded_settings_are_not_resumed(tmp_path):
    trainer, *_ = build(tmp_path, stop_at=2)
    trainer.run()
    (tmp_path / ResumeFromCheckpoint.settings_file).unlink()  # as written by version 0.1.0
    with pytest.raises(InputError, match="without run_settings.json"):
        build(tmp_path)[0].run()
    fresh = tmp_path / "fresh"
    build(fresh, stop_at=1)[0].run()
    recorded = json.loads((fresh / ResumeFromCheckpoint.settings_file).read_text())
    assert recorded["weighting"]["_target_"] == "monai_mlbseg.engines.stage2.weightings.MetaWeighting"


def test_a_failing_save_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    trainer, *_ = build(tmp_path, epochs=1)

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        trainer.run()
    left = [p.name for p in tmp_path.iterdir()]
    assert left == [ResumeFromCheckpoint.settings_file], "neither a checkpoint nor a temporary file may remain"


def test_latest_checkpoint_ignores_other_and_temporary_files(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None
    for name in ["checkpoint_iteration=2.pt", "checkpoint_iteration=12.pt", "tmpab12cd", "notes.txt"]:
        (tmp_path / name).write_bytes(b"x")
    assert latest_checkpoint(tmp_path).name == "checkpoint_iteration=12.pt"
    (tmp_path / "checkpoint_final_iteration=12.pt").write_bytes(b"x")
    assert latest_checkpoint(tmp_path).name == "checkpoint_final_iteration=12.pt"


def test_load_weights_accepts_state_dicts_and_checkpoints_and_names_bad_files(tmp_path):
    net = NestedUNet(2, features=(4, 8))
    plain = save_weights(net, tmp_path / "model.pt")
    torch.save({"network": net.state_dict(), "optimizer": {}}, tmp_path / "ckpt.pt")
    for path in (plain, tmp_path / "ckpt.pt"):
        other = NestedUNet(2, features=(4, 8))
        load_weights(other, path)
        assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), net.state_dict().values()))
    with pytest.raises(InputError, match=r"other\.pt.*does not match the network NestedUNet.*shape mismatches"):
        torch.save(NestedUNet(2, features=(2, 8)).state_dict(), tmp_path / "other.pt")
        load_weights(net, tmp_path / "other.pt")
    with pytest.raises(InputError, match=r"list\.pt.*not a state dict"):
        torch.save([1, 2, 3], tmp_path / "list.pt")
        load_weights(net, tmp_path / "list.pt")
    with pytest.raises(InputError, match=r"garbage\.pt.*not a readable"):
        (tmp_path / "garbage.pt").write_bytes(b"not a zip file")
        load_weights(net, tmp_path / "garbage.pt")
    with pytest.raises(InputError, match=r"nothing\.pt.*not found"):
        load_weights(net, tmp_path / "nothing.pt")
    with pytest.raises(InputError, match="missing"):
        torch.save({"final.conv.weight": torch.zeros(1)}, tmp_path / "partial.pt")
        load_weights(net, tmp_path / "partial.pt")


def test_run_stage_saves_then_skips(tmp_path):
    trainer, net, *_ = build(tmp_path / "ckpt", epochs=1)
    model = tmp_path / "models" / "stage.pt"
    assert run_stage(trainer, model) is True and model.is_file()
    saved = torch.load(model, weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in net.state_dict().items())
    again, net2, *_ = build(tmp_path / "ckpt2", epochs=1, seed=5)
    assert run_stage(again, model) is False and again.state.iteration == 0
    assert all(torch.equal(saved[k], v) for k, v in net2.state_dict().items()), "weights loaded when skipped"


def test_a_resumed_run_restores_the_state_of_its_weighting(tmp_path):
    """A weighting with a state (moving averages, a weight network and its optimizer) continues from the checkpoint."""
    trainer, *_ = build(tmp_path, stop_at=3, method="weak_to_strong", weighting=AmortisedMetaWeighting())
    trainer.run()
    saved = torch.load(latest_checkpoint(tmp_path), weights_only=True)["trainer"]["parts"]["weighting"]
    net_state = {k: v.clone() for k, v in trainer.weighting.net.state_dict().items()}
    assert all(torch.equal(saved["net"][k], v) for k, v in net_state.items())

    resumed, *_ = build(tmp_path, seed=5, method="weak_to_strong", weighting=AmortisedMetaWeighting())
    restored = {}
    resumed.add_event_handler(
        Events.ITERATION_STARTED(once=4),
        lambda e: restored.update({k: v.clone() for k, v in e.weighting.net.state_dict().items()}),
    )
    resumed.run()
    assert resumed.state.iteration == 10
    assert all(torch.equal(restored[k], v) for k, v in net_state.items()), "the weight network was restored"
    assert resumed.weighting.optimizer.state_dict()["state"], "and its optimizer's moments"
