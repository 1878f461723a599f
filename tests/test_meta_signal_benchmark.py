import pytest
import torch

from benchmarks.experiments import meta_signal, real_la


def _pairwise_auc(scores, positive):
    pos, neg = scores[positive], scores[~positive]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


def test_auc_equals_the_pairwise_probability_with_ties():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (200,), generator=g).float()  # many ties
    positive = torch.rand(200, generator=g) < 0.3
    assert meta_signal.auc(scores, positive) == pytest.approx(_pairwise_auc(scores, positive), abs=1e-12)
    ordered = torch.arange(10.0)
    assert meta_signal.auc(ordered, ordered >= 5) == 1.0 and meta_signal.auc(-ordered, ordered >= 5) == 0.0
    assert meta_signal.auc(ordered, ordered >= 0) != meta_signal.auc(ordered, ordered >= 0)  # nan: one class only


def test_boundary_band_is_the_ring_around_the_label_edge():
    label = torch.zeros(1, 1, 20, 20)
    label[..., 5:15, 5:15] = 1
    band = meta_signal.boundary_band(label, width=2)
    assert band[0, 0, 10, 10].item() is False, "deep inside"
    assert band[0, 0, 0, 0].item() is False, "far outside"
    assert band[0, 0, 5, 10] and band[0, 0, 3, 10] and band[0, 0, 6, 10]
    assert not band[0, 0, 2, 10] and not band[0, 0, 8, 10]
    assert int(band.sum()) == 14 * 14 - 6 * 6


def test_signal_stats_of_a_perfectly_informative_map():
    label = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    gt = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    right = label == gt
    x = torch.where(right, torch.tensor(2.0), torch.tensor(-1.0))
    s = meta_signal.signal_stats(x, label, gt)
    assert s["auc"] == 1.0 and s["p_pos_right"] == 1.0 and s["p_pos_wrong"] == 0.0
    assert s["weight_ratio"] == 0.0 and s["wrong_fraction"] == pytest.approx(2 / 6)
    assert s["p_pos_fg"] == pytest.approx(2 / 3) and s["p_pos_bg"] == pytest.approx(2 / 3)


def test_end_to_end_on_a_quick_benchmark_folder(tmp_path):
    out = tmp_path / "bench"
    real_la.main(["--quick", "--out", str(out), "--seeds", "0", "--variants", ""])
    argv = ["--data_dir", str(out / "data"), "--out", str(out), "--num_labeled", "2", "--num_validation", "3"]
    argv += ["--image_size", "32", "--features", "4,8", "--slices", "2", "--clean_batches", "1,3", "--threads", "1"]
    figures = meta_signal.main(argv)
    assert figures["slices"] == 2 and set(figures["clean_batches"]) == {"1", "3"}
    for parts in figures["clean_batches"].values():
        assert parts["all"]["pixels"] == 2 * 5 * 32 * 32, "two slices, five views each"
        assert 0 < parts["band"]["pixels"] < parts["all"]["pixels"]
        assert 0.0 <= parts["all"]["p_pos_right"] <= 1.0
    assert (out / "seed0" / "meta_signal.json").is_file()
    with pytest.raises(SystemExit, match="stage 1 of seed 1"):
        meta_signal.main([*argv, "--seed", "1"])
