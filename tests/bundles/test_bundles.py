"""The two bundles through MONAI's own bundle machinery, on small synthetic data in every supported format."""

import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, verify_net_in_out
from monai.transforms import RandFlipd, RandRotated

from monai_mlbseg.bundles import TEMPLATE_DIR, TEMPLATE_FILES, bundles, render_bundle, stale_files, write_bundle
from monai_mlbseg.data import build_datalist, make_synthetic_dataset, read_case_list
from monai_mlbseg.engines.stage2 import ConfidenceWeighting, JointStep, LabeledOnly, TwoSteps, UniformWeighting
from monai_mlbseg.experimental import AdaptiveConfidenceWeighting
from monai_mlbseg.networks import NestedUNet
from monai_mlbseg.pipeline import slice_preprocessing
from monai_mlbseg.transforms import StrongIntensityAugment
from monai_mlbseg.utils import InputError
from tests.bundle_utils import (
    BUNDLES,
    REPO,
    bundle_command,
    copy_bundle,
    make_data,
    overrides,
    run_command,
    run_folders,
    workflow,
)

FORMATS = {"mlbseg_la": ["uamt_h5", "la_raw", "msd_heart"], "mlbseg_prostate": ["promise12", "msd_prostate"]}
DEFAULT_FORMAT = {"mlbseg_la": "uamt_h5", "mlbseg_prostate": "promise12"}


def test_committed_bundles_equal_the_generated_ones():
    assert stale_files(REPO / "bundles") == [], "run `python -m monai_mlbseg bundles --write` and commit the result"


def test_the_bundles_differ_only_in_their_data():
    # the data, and the default stage-2 method: the best one measured on that data (docs/results.md)
    data_keys = {"dataset_dir", "data_format", "h5_spacing", "split", "stage2_method"}
    la, pr = render_bundle("mlbseg_la"), render_bundle("mlbseg_prostate")
    for name in ("train.json", "inference.json", "evaluate.json", "multi_gpu_train.json"):
        a, b = json.loads(la[f"configs/{name}"]), json.loads(pr[f"configs/{name}"])
        differing = {k for k in set(a) | set(b) if a.get(k) != b.get(k)}
        assert differing <= data_keys, f"{name}: {sorted(differing - data_keys)} differ beyond the data"
    assert la["configs/logging.conf"] == pr["configs/logging.conf"] and la["LICENSE"] == pr["LICENSE"]
    a, b = json.loads(la["configs/metadata.json"]), json.loads(pr["configs/metadata.json"])
    for key in ("version", "monai_version", "pytorch_version", "numpy_version", "required_packages_version"):
        assert a[key] == b[key]
    assert a["network_data_format"]["inputs"] == b["network_data_format"]["inputs"]


def test_generator_fills_every_placeholder_and_uses_every_value(tmp_path, capsys):
    values = json.loads((TEMPLATE_DIR / "values" / "mlbseg_la.json").read_text())
    train = json.loads(render_bundle("mlbseg_la", values)["configs/train.json"])
    assert train["dataset_dir"] == values["dataset_dir"] and "<<" not in json.dumps(train)
    with pytest.raises(KeyError, match="<<split>>"):
        render_bundle("mlbseg_la", {k: v for k, v in values.items() if k != "split"})
    with pytest.raises(ValueError, match="not_a_placeholder"):
        render_bundle("mlbseg_la", {**values, "not_a_placeholder": 1})
    write_bundle("mlbseg_prostate", tmp_path / "mlbseg_prostate")
    (tmp_path / "mlbseg_la" / "configs").mkdir(parents=True)
    assert stale_files(tmp_path) == [tmp_path / "mlbseg_la" / p for p in TEMPLATE_FILES]
    with pytest.raises(SystemExit) as info:
        bundles(root=str(tmp_path))
    assert info.value.code == 1 and str(tmp_path / "mlbseg_la" / "configs" / "train.json") in capsys.readouterr().out
    bundles(write=True, root=str(tmp_path))
    assert stale_files(tmp_path) == [] and bundles(root=str(tmp_path)) == []


def test_train_config_instantiates_the_pipeline_slice_transforms():
    parser = ConfigParser()
    parser.read_config(str(BUNDLES["mlbseg_la"] / "configs" / "train.json"))
    parser["image_size"] = [48, 40]
    parser["slice_augmentation#rotate_degrees"] = 15.0
    prep, augment = parser.get_parsed_content("slice_preprocessing"), parser.get_parsed_content("slice_augmentation")
    expected = slice_preprocessing((48, 40))
    assert [type(t) for t in prep.transforms] == [type(t) for t in expected.transforms]
    assert tuple(prep.transforms[1].resizer.spatial_size) == (48, 40)
    assert [type(t) for t in augment.transforms] == [RandFlipd, RandRotated]
    assert augment.transforms[1].rand_rotate.range_x == pytest.approx((-math.radians(15), math.radians(15)))


@pytest.mark.parametrize("name", sorted(BUNDLES))
def test_metadata_follows_the_bundle_specification(name):
    meta = json.loads((BUNDLES[name] / "configs" / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"]
    assert "monai-mlbseg" in meta["required_packages_version"]
    image = meta["network_data_format"]["inputs"]["image"]
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert image["num_channels"] == 1 and image["spatial_shape"] == [144, 144] and image["value_range"] == [0, 1]
    assert pred["num_channels"] == 1 and pred["channel_def"]["0"] == "background"
    for f in (
        "configs/train.json",
        "configs/inference.json",
        "configs/evaluate.json",
        "configs/multi_gpu_train.json",
        "configs/logging.conf",
        "docs/README.md",
        "LICENSE",
        "large_files.yml",
    ):
        assert (BUNDLES[name] / f).is_file(), f"{name} lacks {f}"
    assert not (BUNDLES[name] / "models").exists(), "weights are never committed"


def test_shipped_splits():
    configs = BUNDLES["mlbseg_la"] / "configs"
    train, test = read_case_list(configs / "train.list"), read_case_list(configs / "test.list")
    assert len(train) == 80 and len(test) == 20 and not set(train) & set(test)
    assert train[:4] == ["06SR5RBREL16DQ6M8LWS", "0RZDK210BSMWAA6467LU", "1D7CUD1955YZPGK8XHJX", "1GU15S0GJ6PFNARO469W"]
    split = json.loads((BUNDLES["mlbseg_prostate"] / "configs" / "train.json").read_text())["split"]
    assert split["labeled"] == ["Case29", "Case14", "Case05"] and len(split["test"]) == 10


def test_prostate_reference_split_on_fifty_promise12_cases(tmp_path):
    ids = [f"Case{i:02d}" for i in range(50)]
    make_synthetic_dataset(tmp_path, "promise12", num_cases=50, shape=(12, 12, 8), seed=0, case_ids=ids)
    split = json.loads((BUNDLES["mlbseg_prostate"] / "configs" / "train.json").read_text())["split"]
    dl = build_datalist(tmp_path, "promise12", **split)
    assert [i["case_id"] for i in dl["labeled"]] == ["Case29", "Case14", "Case05"]
    assert len(dl["unlabeled"]) == 37 and len(dl["test"]) == 10
    assert all("gt" in i and "label" not in i for i in dl["unlabeled"])


def test_uamt_lists_pick_the_first_n_labeled(tmp_path):
    configs = BUNDLES["mlbseg_la"] / "configs"
    train = read_case_list(configs / "train.list")
    make_synthetic_dataset(
        tmp_path,
        "uamt_h5",
        num_cases=12,
        shape=(12, 12, 8),
        seed=0,
        case_ids=train[:10] + read_case_list(configs / "test.list")[:2],
    )
    for n in (4, 8):
        dl = build_datalist(
            tmp_path, "uamt_h5", train_list=configs / "train.list", test_list=configs / "test.list", num_labeled=n
        )
        assert [i["case_id"] for i in dl["labeled"]] == train[:n]
        assert [i["case_id"] for i in dl["unlabeled"]] == train[n:]


@pytest.mark.parametrize("name", sorted(BUNDLES))
def test_check_properties_of_both_workflows(name, tmp_path):
    bundle = copy_bundle(name, tmp_path)
    fmt = DEFAULT_FORMAT[name]
    data, split = make_data(tmp_path, fmt)
    over = overrides(bundle, data, fmt, split)
    assert workflow(bundle, ["train.json"], "train", **over).check_properties() == []
    (bundle / "models").mkdir(exist_ok=True)
    torch.save(NestedUNet(2, features=(4, 8)).state_dict(), bundle / "models" / "model.pt")
    assert workflow(bundle, ["inference.json"], "infer", **over).check_properties() == []
    assert workflow(bundle, ["inference.json", "evaluate.json"], "infer", **over).check_properties() == []


@pytest.mark.parametrize("name", sorted(BUNDLES))
def test_verify_net_in_out_with_the_reference_network(name):
    configs = BUNDLES[name] / "configs"
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(configs / "metadata.json"),
        config_file=str(configs / "inference.json"),
        device="cpu",
        p=1,
        n=1,
        any=8,
        bundle_root=str(BUNDLES[name]),
    )


@pytest.mark.parametrize("name", sorted(BUNDLES))
def test_torchscript_export_reproduces_the_eager_network(name, tmp_path):
    from monai.bundle import ckpt_export

    bundle = copy_bundle(name, tmp_path)
    net = NestedUNet(2, features=(4, 8, 16)).eval()
    (bundle / "models").mkdir(exist_ok=True)
    torch.save(net.state_dict(), bundle / "models" / "model.pt")
    ckpt_export(
        net_id="network_def",
        filepath=str(bundle / "models" / "model.ts"),
        ckpt_file=str(bundle / "models" / "model.pt"),
        meta_file=str(bundle / "configs" / "metadata.json"),
        config_file=str(bundle / "configs" / "inference.json"),
        bundle_root=str(bundle),
        features=[4, 8, 16],
    )
    scripted = torch.jit.load(str(bundle / "models" / "model.ts"))
    x = torch.rand(2, 1, 144, 144)
    with torch.no_grad():
        assert torch.allclose(scripted(x), net(x), atol=1e-5)


def run_bundle(name, fmt, tmp_path):
    bundle = copy_bundle(name, tmp_path)
    data, split = make_data(tmp_path, fmt)
    over = overrides(bundle, data, fmt, split)
    wf = workflow(bundle, ["train.json"], "train", run_id="training", **over)
    wf.run()
    wf.finalize()
    return bundle, data, over


@pytest.mark.parametrize("name,fmt", [(n, f) for n in sorted(FORMATS) for f in FORMATS[n]])
def test_train_then_infer_on_every_format(name, fmt, tmp_path):
    bundle, data, over = run_bundle(name, fmt, tmp_path)
    model = bundle / "models" / "model.pt"
    state = torch.load(model, weights_only=True)
    NestedUNet(2, features=(4, 8)).load_state_dict(state)
    runs = run_folders(bundle)
    assert len(runs) == 1
    run = runs[0]
    assert (run / "stage1.pt").is_file(), "stage 1 ran and saved its weights"
    initial = sorted(p.name for p in (run / "initial_labels").iterdir())
    labels = [p for p in initial if p.endswith(".nii.gz")]
    assert labels and initial == sorted(labels + [p + ".sha256" for p in labels]), "each label with its digest"
    assert not list(data.rglob("*.partial-*")) and not list(bundle.rglob("*.partial-*"))
    final = [p.name for p in (run / "stage2").iterdir()]
    assert any("final_iteration=3" in p for p in final), final

    wf = workflow(bundle, ["inference.json"], "infer", **over)
    wf.run()
    masks = sorted((bundle / "eval").rglob("*_seg.nii.gz"))
    test_items = over["split"]["test"]
    assert len(masks) == len(test_items)
    mask = nib.load(masks[0])
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
    item = build_datalist(data, fmt, **over["split"])["test"][0]
    image_path = data / item["image"]
    if fmt != "uamt_h5":
        ref = nib.load(image_path) if str(image_path).endswith(".nii.gz") else None
        if ref is not None:
            assert mask.shape == ref.shape[:3] and np.allclose(mask.affine, ref.affine, atol=1e-4)


@pytest.mark.parametrize("name", sorted(BUNDLES))
def test_evaluate_writes_per_case_metrics(name, tmp_path):
    fmt = DEFAULT_FORMAT[name]
    bundle, data, over = run_bundle(name, fmt, tmp_path)
    workflow(bundle, ["inference.json", "evaluate.json"], "infer", **over).run()
    report = json.loads((bundle / "eval" / "metrics.json").read_text())
    cases = report["cases"]
    assert [c["case_id"] for c in cases] == over["split"]["test"]
    for key in ("dice", "jaccard", "hd95_voxel", "asd_voxel", "hd95_mm", "asd_mm"):
        assert key in cases[0] and key in report["summary"]
    csv = (bundle / "eval" / "metrics.csv").read_text().splitlines()
    assert csv[0].startswith("case_id,dice,jaccard") and csv[-2].startswith("mean,")


def test_rerun_skips_completed_stages_and_resumes(tmp_path):
    bundle, data, over = run_bundle("mlbseg_la", "uamt_h5", tmp_path)
    run = run_folders(bundle)[0]
    stamps = {p: p.stat().st_mtime_ns for p in [run / "stage1.pt", *(run / "initial_labels").iterdir()]}
    wf = workflow(bundle, ["train.json"], "train", run_id="run", **over)
    wf.run()
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps, "stage 1 and the initial labels are reused"
    assert len(run_folders(bundle)) == 1
    changed = {**over, "features": [4, 8, 16]}
    workflow(bundle, ["train.json"], "train", run_id="run", **changed).run()
    assert len(run_folders(bundle)) == 2, "other settings start a separate run"


def test_training_refuses_bad_data_before_it_starts(tmp_path):
    bundle = copy_bundle("mlbseg_la", tmp_path)
    data, split = make_data(tmp_path, "uamt_h5")
    split = {"labeled": ["la_a", "la_e"], "test": ["la_e"]}
    wf = workflow(bundle, ["train.json"], "train", run_id="training", **overrides(bundle, data, "uamt_h5", split))
    with pytest.raises(Exception) as info:
        wf.run()
    assert isinstance(info.value, InputError) or isinstance(info.value.__cause__, InputError)
    assert "la_e" in str(info.value.__cause__ or info.value)
    assert not (bundle / "work").exists() or not any((bundle / "work").rglob("*.pt"))
    assert not (bundle / "models").exists()


def test_monai_label_style_overrides_train_from_labeled_pairs_only(tmp_path):
    """MONAI Label overrides train#dataset#data with labeled NIfTI pairs and sets no data folder."""
    bundle = copy_bundle("mlbseg_prostate", tmp_path)
    pairs = []
    rng = np.random.default_rng(0)
    for i in range(3):
        img = rng.normal(size=(24, 20, 6)).astype(np.float32)
        lab = np.zeros((24, 20, 6), np.uint8)
        lab[8:16, 6:14, 1:5] = 1
        img[lab > 0] += 2
        for kind, arr in (("img", img), ("lab", lab)):
            nib.save(nib.Nifti1Image(arr, np.eye(4)), tmp_path / f"{kind}{i}.nii.gz")
        pairs.append({"image": str(tmp_path / f"img{i}.nii.gz"), "label": str(tmp_path / f"lab{i}.nii.gz")})
    over = {
        "bundle_root": str(bundle),
        "train#dataset#data": pairs,
        "validate#dataset#data": [],
        "features": [4, 8],
        "image_size": [32, 32],
        "train#trainer#max_epochs": 2,
        "device": "cpu",
    }
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "train.json"))
    assert "dataset_dir" in parser and not (tmp_path / "workspace").exists()
    wf = workflow(bundle, ["train.json"], "train", run_id="run", **over)
    wf.run()
    assert (bundle / "models" / "model.pt").is_file()
    run = run_folders(bundle)[0]
    assert not (run / "stage1.pt").exists(), "no unlabeled data: stage 1 and the bootstrap are skipped"
    assert any("final_iteration" in p.name for p in (run / "stage2").iterdir())


@pytest.mark.parametrize("name", sorted(BUNDLES))
def test_stage2_method_parts_reach_the_trainer(name, tmp_path):
    bundle = copy_bundle(name, tmp_path)
    data, split = make_data(tmp_path, DEFAULT_FORMAT[name])
    over = overrides(bundle, data, DEFAULT_FORMAT[name], split)
    parser = workflow(bundle, ["train.json"], "train", **over).parser
    default = parser.get_parsed_content("train#trainer")
    # the measured best on left-atrium scans, for both bundles (no prostate data to measure on)
    assert parser.get_parsed_content("stage2_method") == "weak_to_strong"
    assert [s.name for s in default.sources] == ["teacher"]
    assert isinstance(default.weighting, ConfidenceWeighting) and default.weighting.threshold == 0.95
    assert isinstance(default.schedule, JointStep) and default.schedule.grad_clip is None
    assert default.teacher is parser.get_parsed_content("teacher"), "the checkpointed teacher is the EMA network"
    changed = {"train#trainer#sources": "$[monai_mlbseg.engines.stage2.InitialLabels()]"}
    trainer = workflow(bundle, ["train.json"], "train", **over, **changed).parser.get_parsed_content("train#trainer")
    assert [s.name for s in trainer.sources] == ["initial"]
    options = {"stage2_options": {"weighting": "adaptive"}}
    trainer = workflow(bundle, ["train.json"], "train", **over, **options).parser.get_parsed_content("train#trainer")
    assert isinstance(trainer.weighting, AdaptiveConfidenceWeighting)
    control = {"stage2_control": True}
    trainer = workflow(bundle, ["train.json"], "train", **over, **control).parser.get_parsed_content("train#trainer")
    assert trainer.supervised_only and isinstance(trainer.schedule, LabeledOnly) and trainer.sources == []
    assert isinstance(trainer.clean_augment, StrongIntensityAugment), "the control sees the method's perturbation"
    method = {"stage2_method": "mean_teacher"}
    trainer = workflow(bundle, ["train.json"], "train", **over, **method).parser.get_parsed_content("train#trainer")
    assert isinstance(trainer.weighting, UniformWeighting) and trainer.sources == []
    assert [t.name for t in trainer.terms] == ["loss_mt"] and trainer.mean_teacher is not None
    assert trainer.student_augment is None and isinstance(trainer.schedule, TwoSteps)
    assert trainer.schedule.grad_clip == 0.2
    w2s = {"stage2_method": "weak_to_strong"}
    trainer = workflow(bundle, ["train.json"], "train", **over, **w2s).parser.get_parsed_content("train#trainer")
    assert isinstance(trainer.schedule, JointStep) and isinstance(trainer.weighting, ConfidenceWeighting)
    assert [s.name for s in trainer.sources] == ["teacher"] and trainer.terms == []
    assert trainer.schedule.grad_clip is None
    assert isinstance(trainer.student_augment, StrongIntensityAugment) and trainer.clean_augment is None
    custom = {
        **w2s,
        "train#trainer#terms": "$[monai_mlbseg.engines.stage2.MeanTeacherTerm(1.0, "
        "monai_mlbseg.losses.ConfidentPseudoLabelLoss(0.8))]",
        "stage2_options": {"grad_clip": 0.5, "clean_augment": {"contrast": 0.3}},
    }
    trainer = workflow(bundle, ["train.json"], "train", **over, **custom).parser.get_parsed_content("train#trainer")
    assert trainer.terms[0].loss.threshold == 0.8 and trainer.clean_augment.contrast == 0.3
    assert trainer.schedule.grad_clip == 0.5, "the method's clip is an option away"
    with pytest.raises(RuntimeError) as raised:  # MONAI's config parser wraps the error of the expression
        parser = workflow(bundle, ["train.json"], "train", **over, stage2_method="meta").parser
        parser.get_parsed_content("train#trainer")
    assert "unknown stage-2 method 'meta'; known: mlbseg, weak_to_strong" in str(raised.value.__cause__)


def test_the_labeled_only_method_trains_on_the_labeled_data_alone_through_the_bundle_command(la_run):
    """``--stage2_method labeled_only`` on ``python -m monai.bundle run training``: clean steps only, recorded."""
    bundle, data, split = la_run["bundle"], la_run["data"], la_run["split"]
    result = run_command(bundle_command(bundle, "training", data, "uamt_h5", split, stage2_method="labeled_only"))
    assert result.returncode == 0, result.stdout[-3000:]
    (run,) = run_folders(bundle)
    settings = json.loads((run / "stage2" / "run_settings.json").read_text())
    assert settings["supervised_only"] is True and settings["sources"] == []
    assert settings["schedule"]["_target_"].endswith("LabeledOnly") and settings["schedule"]["grad_clip"] == 0.2


def test_the_bundles_require_the_package_version_they_are_rendered_with():
    from monai_mlbseg import __version__

    for name in BUNDLES:
        metadata = json.loads((BUNDLES[name] / "configs" / "metadata.json").read_text())
        assert metadata["required_packages_version"]["monai-mlbseg"] == __version__
        rendered = json.loads(render_bundle(name)["configs/metadata.json"])
        assert rendered["required_packages_version"]["monai-mlbseg"] == __version__
    with pytest.raises(ValueError, match="package's own version"):
        render_bundle("mlbseg_la", {"package_version": "0.0.1"})


def test_the_documented_run_ids_are_top_level_ids_of_both_bundles():
    from monai_mlbseg.bundles import RUN_IDS

    for name in BUNDLES:
        train = json.loads((BUNDLES[name] / "configs" / "train.json").read_text())
        assert set(RUN_IDS) <= set(train), sorted(set(RUN_IDS) - set(train))
        readme = (BUNDLES[name] / "docs" / "README.md").read_text()
        assert all(f"| `{key}` |" in readme for key in RUN_IDS), name
