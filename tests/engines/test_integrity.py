"""Faults that lose nothing: damaged checkpoints are found before use, and a kill inside a save keeps the last one."""

import pytest
import torch
from ignite.engine import Events
from ignite.handlers import DiskSaver

from monai_mlbseg.engines import load_weights, save_weights
from monai_mlbseg.engines.checkpoint import checkpoints, state_problem
from monai_mlbseg.networks import NestedUNet
from monai_mlbseg.utils import InputError, digest_path, file_digest
from tests.engines.test_checkpoint import build


def _flip_a_weight(path, before=0.0):
    """Overwrite one float32 of the file in place (a value becomes ~6e37): still a loadable, finite checkpoint."""
    data = bytearray(path.read_bytes())
    offset = len(data) // 2
    offset -= offset % 4
    data[offset : offset + 4] = bytes([0x7E, 0x34, 0x12, 0x7E])
    path.write_bytes(bytes(data))


def test_every_checkpoint_records_its_digest_and_damage_everywhere_is_refused_by_name(tmp_path):
    trainer, *_ = build(tmp_path, stop_at=4)
    trainer.run()
    found = checkpoints(tmp_path)
    assert len(found) == 2, "the interval checkpoint and the final one"
    for path in found:
        assert digest_path(path).read_text().split()[0] == file_digest(path)
        _flip_a_weight(path)
    with pytest.raises(InputError) as refused:
        build(tmp_path)[0].run()
    message = str(refused.value)
    assert str(tmp_path) in message and "no intact checkpoint" in message
    assert all(path.name in message for path in found) and "does not match the digest" in message


def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one_and_says_so(tmp_path, caplog):
    trainer, *_ = build(tmp_path, stop_at=4)
    trainer.run()
    newest, intact = checkpoints(tmp_path)
    assert (newest.name, intact.name) == ("checkpoint_final_iteration=4.pt", "checkpoint_iteration=4.pt")
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated, as by a full disk
    resumed, *_ = build(tmp_path)
    started = {}
    resumed.add_event_handler(Events.STARTED, lambda e: started.update(iteration=e.state.iteration))
    with caplog.at_level("WARNING"):
        resumed.run()
    assert started["iteration"] == 4, "the intact checkpoint's state was resumed"
    assert any(newest.name in r.message and "not used" in r.message for r in caplog.records)


def test_non_finite_state_is_refused_even_without_a_digest(tmp_path):
    net = NestedUNet(2, features=(4, 8))
    state = net.state_dict()
    state["final.weight"][0] = float("inf")
    torch.save(state, tmp_path / "model.pt")  # no digest: a file of an earlier version
    with pytest.raises(InputError, match="non-finite values in final.weight"):
        load_weights(NestedUNet(2, features=(4, 8)), tmp_path / "model.pt")
    assert state_problem({"opt": {"state": {0: {"momentum": torch.tensor([1.0, float("nan")])}}}}) is not None
    assert state_problem({"step": torch.tensor(3), "w": torch.zeros(2)}) is None


def test_a_model_changed_after_it_was_written_is_refused_by_name(tmp_path):
    net = NestedUNet(2, features=(4, 8))
    path = save_weights(net, tmp_path / "model.pt")
    load_weights(NestedUNet(2, features=(4, 8)), path)  # intact: loads
    _flip_a_weight(path)
    with pytest.raises(InputError, match="does not match the digest") as refused:
        load_weights(NestedUNet(2, features=(4, 8)), path)
    assert str(path) in str(refused.value)
    path.write_bytes(b"")  # truncated to nothing: named, not a bare EOFError
    digest_path(path).unlink()
    with pytest.raises(InputError, match="not a readable") as refused:
        load_weights(NestedUNet(2, features=(4, 8)), path)
    assert str(path) in str(refused.value)


def test_a_kill_inside_a_save_keeps_the_previous_checkpoint_and_its_leftover_is_cleaned(tmp_path, monkeypatch):
    trainer, *_ = build(tmp_path, stop_at=3)
    trainer.run()  # keeps one interval checkpoint (iteration 2) and the final one (iteration 3)
    before = checkpoints(tmp_path)
    save = DiskSaver._save_func

    calls = []

    def killed(self, checkpoint, path, func):  # the second save dies with half a temporary file written
        calls.append(path.name)
        if len(calls) == 1:
            return save(self, checkpoint, path, func)
        (self.dirname / "tmpkilled0").write_bytes(b"half a checkpoint")
        raise SystemExit("killed while saving")

    monkeypatch.setattr(DiskSaver, "_save_func", killed)
    with pytest.raises(SystemExit):
        build(tmp_path)[0].run()
    assert calls[:2] == ["checkpoint_iteration=4.pt", "checkpoint_iteration=6.pt"]
    replaced = tmp_path / "checkpoint_iteration=4.pt"
    assert replaced.is_file() and digest_path(replaced).is_file(), "the checkpoint a save replaces outlives the save"
    assert all(p.is_file() and digest_path(p).is_file() for p in before)
    monkeypatch.setattr(DiskSaver, "_save_func", save)
    resumed, *_ = build(tmp_path)
    resumed.run()
    assert not (tmp_path / "tmpkilled0").exists(), "the killed save's temporary file is removed"
    names = [p.name for p in checkpoints(tmp_path)]
    assert names[0] == "checkpoint_final_iteration=10.pt" and "checkpoint_iteration=10.pt" in names


def test_truncated_run_settings_are_refused_by_name(tmp_path):
    trainer, *_ = build(tmp_path, stop_at=2)
    trainer.run()
    (tmp_path / "run_settings.json").write_text('{"sources": [')
    with pytest.raises(InputError, match="recorded settings") as refused:
        build(tmp_path)[0].run()
    assert str(tmp_path / "run_settings.json") in str(refused.value)


def test_damaged_stage_weights_are_written_again_from_the_stage_checkpoints_and_say_so(tmp_path, caplog):
    import logging

    from monai_mlbseg.engines import run_stage

    trainer, net, *_ = build(tmp_path / "stage")
    weights = tmp_path / "stage.pt"
    assert run_stage(trainer, weights) is True
    finished = {k: v.clone() for k, v in net.state_dict().items()}
    _flip_a_weight(weights)
    trainer, net, *_ = build(tmp_path / "stage", seed=1)  # a fresh process: other initial weights
    with caplog.at_level(logging.INFO):
        assert run_stage(trainer, weights) is True, "the stage ran again instead of loading damaged weights"
    assert f"{weights} cannot be used (its content does not match the digest" in caplog.text
    assert "resumed from" in caplog.text and "at iteration" in caplog.text, "from its final checkpoint, not from zero"
    assert all(torch.equal(net.state_dict()[k], v) for k, v in finished.items()), "the stage's own final weights"
    load_weights(NestedUNet(2, features=(4, 8)), weights)
