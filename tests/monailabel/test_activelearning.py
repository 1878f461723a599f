"""Active learning from the method's own uncertainty: PLE-view disagreement scores of the unlabeled studies, kept in
the datastore per model, and the strategy that picks the most uncertain study."""

import os

import pytest
import torch

if os.environ.get("MLBSEG_REQUIRE_MONAILABEL") != "1":
    pytest.importorskip(
        "monailabel.interfaces.app", reason="MONAI Label's server is not installed (.ci/run installs it)"
    )


def test_the_study_whose_views_disagree_most_is_suggested_and_scores_follow_the_model(app, monkeypatch):
    from monailabel.datastore.local import LocalDatastore

    from monai_mlbseg.monailabel import SCORE_KEY, MLBSegApp, MostDisagreement, PLEDisagreementScoring
    from monai_mlbseg.networks import NestedUNet

    folder, studies, _ = app
    bundle = folder / "model" / "mlbseg_la"
    store = LocalDatastore(str(studies), extensions=("*.nii.gz",), auto_reload=False)
    scoring = PLEDisagreementScoring(str(bundle))
    strategy = MostDisagreement(scoring)
    assert strategy({}, store) == {"id": "s2", "weight": 0.0}, "no model yet: the first unlabeled study"

    (bundle / "models").mkdir()
    torch.manual_seed(0)
    torch.save(NestedUNet(2, features=(4, 8)).state_dict(), bundle / "models" / "model.pt")
    scores = scoring({}, store)
    assert sorted(scores) == ["s2", "s3", "s4"], "the unlabeled studies only"
    assert all(score >= 0 for score in scores.values())
    assert strategy({}, store)["id"] == max(scores, key=scores.get)
    assert store.get_image_info("s3")[SCORE_KEY]["score"] == scores["s3"], "kept in the datastore"

    computed = []
    real = scoring.score
    monkeypatch.setattr(scoring, "score", lambda image, network: computed.append(image) or real(image, network))
    assert scoring({}, store) == scores and computed == [], "the same model: nothing is scored again"
    torch.save(NestedUNet(2, features=(4, 8)).state_dict(), bundle / "models" / "model.pt")
    os.utime(bundle / "models" / "model.pt", (1, 1))
    scoring({}, store)
    assert len(computed) == 3, "a new model: every study is scored again"

    monkeypatch.setattr(scoring, "score", lambda image, network: 0.5 if image.endswith("s4.nii.gz") else 0.1)
    os.utime(bundle / "models" / "model.pt", (2, 2))
    assert strategy({}, store) == {"id": "s4", "weight": 0.5}

    server = MLBSegApp(str(folder), str(studies), {"models": "mlbseg_la"})
    info = server.info()
    assert {"random", "first", "ple_disagreement"} <= set(info["strategies"])
    assert "ple_disagreement_mlbseg_la" in info["scoring"]
