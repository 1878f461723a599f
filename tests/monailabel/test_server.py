"""The app in a real MONAI Label server on 127.0.0.1, driven over HTTP only: save a label, train semi-supervised (a
second ``/train`` meanwhile is refused), ask for the next study, infer on an unlabeled one."""

import json
import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from benchmarks.experiments.monailabel_la import serve

if os.environ.get("MLBSEG_REQUIRE_MONAILABEL") != "1":
    pytest.importorskip(
        "monailabel.interfaces.app", reason="MONAI Label's server is not installed (.ci/run installs it)"
    )
httpx = pytest.importorskip("httpx")


@pytest.fixture
def server(app, tmp_path):
    """The app served by ``monailabel start_server`` (as its ``monailabel`` script runs it) on a free local port."""
    folder, studies, truths = app
    with serve(folder, studies, tmp_path / "server.log", env={"OMP_NUM_THREADS": "1"}) as served:
        yield served.url, folder, studies, truths


def test_label_train_next_sample_and_infer_over_http(server, tmp_path):
    url, folder, studies, truths = server
    info = httpx.get(f"{url}/info/").json()
    options = info["trainers"]["mlbseg_la"]["config"]
    assert options["stage2_method"][0] == "weak_to_strong" and options["use_unlabeled"] is True
    assert "mlbseg_la" not in info["models"], "no weights yet"

    label = tmp_path / "s2_label.nii.gz"
    nib.save(truths["s2"], label)
    with open(label, "rb") as f:
        saved = httpx.put(f"{url}/datastore/label", params={"image": "s2", "tag": "final"}, files={"label": f})
    assert saved.status_code == 200, saved.text

    params = {"stage1_iterations": 4, "stage2_steps": 3, "device": "cpu"}
    started = httpx.post(f"{url}/train/mlbseg_la", params={"run_sync": False}, json=params, timeout=30)
    assert started.status_code == 200 and started.json()["status"] in ("SUBMITTED", "RUNNING"), started.text
    second = httpx.post(f"{url}/train/mlbseg_la", params={"run_sync": False}, json=params, timeout=30)
    assert second.status_code >= 400 and "Already Running" in second.text, "a second /train meanwhile is refused"
    deadline = time.time() + 300
    while time.time() < deadline:
        status = httpx.get(f"{url}/train/", timeout=30).json()
        if status["status"] not in ("SUBMITTED", "RUNNING"):
            break
        time.sleep(2)
    assert status["status"] == "DONE", "\n".join(status.get("details", []))[-3000:]
    result = json.loads(next(line for line in status["details"] if " - Result: " in line).split(" - Result: ")[1])
    assert [os.path.basename(p) for p in result["labeled"]] == ["s0.nii.gz", "s1.nii.gz", "s2.nii.gz"]
    assert [os.path.basename(p) for p in result["unlabeled"]] == ["s3.nii.gz", "s4.nii.gz"]
    manifest = json.loads((Path(result["run_dir"]) / "data_manifest.json").read_text())
    assert Path(result["run_dir"]).parent == folder / "model" / "mlbseg_la" / "work"
    assert [e["image"] for e in manifest["splits"]["unlabeled"]] == ["s3.nii.gz", "s4.nii.gz"], "the run's own record"
    assert (folder / "model" / "mlbseg_la" / "models" / "model.pt").is_file()
    assert "mlbseg_la" in httpx.get(f"{url}/info/").json()["models"], "offered at once, without a restart"

    suggested = httpx.post(f"{url}/activelearning/random", json={}, timeout=30).json()
    assert suggested["id"] in ("s3", "s4"), suggested
    uncertain = httpx.post(f"{url}/activelearning/ple_disagreement", json={}, timeout=120).json()
    assert uncertain["id"] in ("s3", "s4") and uncertain["weight"] >= 0, uncertain

    inferred = httpx.post(
        f"{url}/infer/mlbseg_la",
        params={"image": suggested["id"], "output": "image"},
        json={"device": "cpu"},
        timeout=120,
    )
    assert inferred.status_code == 200, inferred.text[-2000:]
    mask_file = tmp_path / "mask.nii.gz"
    mask_file.write_bytes(inferred.content)
    mask, image = nib.load(mask_file), nib.load(studies / f"{suggested['id']}.nii.gz")
    assert mask.shape == image.shape and np.allclose(mask.affine, image.affine, atol=1e-4)
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
