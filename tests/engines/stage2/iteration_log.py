"""What a stage-2 iteration fires and holds, recorded per event, for the event-contract tests."""

import torch
from monai.engines.utils import IterationEvents

from monai_mlbseg.engines import MetaIterationEvents
from monai_mlbseg.engines.stage2 import STAGE2_TERMS

E, M = IterationEvents, MetaIterationEvents
ALL_EVENTS = [*IterationEvents, *MetaIterationEvents]
IMAGE_LABEL = {"image", "label"}
MONAI_KEYS = {"image", "label", "pred"}
#: the scalars of the default (mlbseg) trainer beyond STAGE2_TERMS: its terms' and its label sources' entries
MLBSEG_KEYS = {"loss_pc", "loss_mt", "weight_initial", "weight_pseudo"}

#: the events of one iteration, in order, with the keys of engine.state.output at each (at MODEL_COMPLETED: at least)
META_ITERATION = [
    (E.FORWARD_COMPLETED, MONAI_KEYS),
    (M.PLE_COMPLETED, MONAI_KEYS),
    (M.WEIGHTS_COMPLETED, MONAI_KEYS),
    (E.LOSS_COMPLETED, MONAI_KEYS | {"loss"}),
    (E.BACKWARD_COMPLETED, MONAI_KEYS | {"loss"}),
    (M.REAL_STEP_COMPLETED, MONAI_KEYS | {"loss"}),
    (M.CLEAN_STEP_STARTED, MONAI_KEYS | {"loss"}),
    (M.CLEAN_BACKWARD_COMPLETED, MONAI_KEYS | {"loss", "loss_clean"}),
    (M.CLEAN_STEP_COMPLETED, MONAI_KEYS | {"loss", "loss_clean"}),
    (E.MODEL_COMPLETED, MONAI_KEYS | set(STAGE2_TERMS) | MLBSEG_KEYS),
]
SUPERVISED_ITERATION = [
    (M.CLEAN_STEP_STARTED, IMAGE_LABEL),
    (E.FORWARD_COMPLETED, MONAI_KEYS),
    (E.LOSS_COMPLETED, MONAI_KEYS | {"loss"}),
    (E.BACKWARD_COMPLETED, MONAI_KEYS | {"loss"}),
    (M.CLEAN_STEP_COMPLETED, MONAI_KEYS | {"loss"}),
    (E.MODEL_COMPLETED, MONAI_KEYS | {"loss", "loss_clean"}),
]


def record(trainer):
    """Per event: the iteration, the output at that moment (a shallow copy) and the student's parameters."""
    log = []

    def handler(engine, event):
        params = torch.cat([p.detach().flatten() for p in engine.network.parameters()])
        log.append((engine.state.iteration, event, dict(engine.state.output), params))

    for event in ALL_EVENTS:
        trainer.add_event_handler(event, handler, event)
    return log


def check_iterations(log, expected, iterations, views):
    assert [(i, event) for i, event, *_ in log] == [(i, e) for i in range(1, iterations + 1) for e, _ in expected]
    for i in range(1, iterations + 1):
        entries = {event: (out, p) for it, event, out, p in log if it == i}
        for event, keys in expected:
            out, _ = entries[event]
            assert set(out) >= keys if event == E.MODEL_COMPLETED else set(out) == keys, (event, set(out))
            assert out["image"].shape == out["label"].shape == (views, 1, 16, 16), event
            assert "pred" not in out or out["pred"].shape == (views, 1, 16, 16), event
        loss = entries[E.LOSS_COMPLETED][0]["loss"]
        assert torch.is_tensor(loss) and loss.requires_grad and loss.ndim == 0, "the loss tensor, as MONAI's"
        assert torch.equal(entries[E.BACKWARD_COMPLETED][1], entries[E.LOSS_COMPLETED][1]), "no step before backward"
        final = entries[E.MODEL_COMPLETED][0]
        assert all(isinstance(final[k], float) for k in expected[-1][1] - MONAI_KEYS), "scalars as floats"
    return {event: [entry for entry in log if entry[1] == event] for event in ALL_EVENTS}
