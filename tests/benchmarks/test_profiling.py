"""The library's named profiler ranges: one ``mlbseg.<name>`` range per call, nested ones included."""

from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

from monai_mlbseg.transforms import PLEViews
from monai_mlbseg.transforms.functional import ple_pseudo_labels, warp_to_views
from monai_mlbseg.utils import SCOPE_PREFIX, profiled


def scope_counts(prof) -> Counter:
    return Counter(e.name for e in prof.events() if e.name.startswith(SCOPE_PREFIX))


def test_profiled_keeps_the_function_and_opens_one_range_per_call():
    @profiled("double")
    def double(x: torch.Tensor) -> torch.Tensor:
        """Twice x."""
        return 2 * x

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        values = [double(torch.full((2,), float(i))) for i in range(3)]
    assert [v.tolist() for v in values] == [[0.0, 0.0], [2.0, 2.0], [4.0, 4.0]]
    assert double.__name__ == "double" and double.__doc__ == "Twice x."
    assert scope_counts(prof) == Counter({"mlbseg.double": 3})


def test_view_and_ensembling_functions_show_as_nested_ranges():
    images = torch.rand(2, 1, 16, 16)
    views = PLEViews(spatial_dims=2).set_random_state(0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = views(images)
        ple_pseudo_labels(torch.sigmoid(out), views.params)
        warp_to_views(images, views.params)
    counts = scope_counts(prof)
    assert counts["mlbseg.view_transform"] == 1 and counts["mlbseg.ple_pseudo_labels"] == 1
    # one direct call plus the one inside the view transform
    assert counts["mlbseg.warp_to_views"] >= 2
    assert counts["mlbseg.warp_from_views"] >= 1  # inside the ensembling
