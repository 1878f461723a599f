#!/usr/bin/env python
"""
Inference throughput and whole-volume latency of :py:class:`monai_mlbseg.inferers.SliceResizeInferer` (figure (d) of
``docs/benchmarks.md``): eval mode, ``no_grad``, a synthetic volume of the left atrium's size, after one warm-up run.

Usage::

    python -m benchmarks.performance.inference                   # NestedUNet 16..256, 144 px, volume 200x140x88
    python -m benchmarks.performance.inference --device cuda --features 64,128,256,512,1024
    python -m benchmarks.performance.inference --quick           # tiny smoke configuration
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from monai_mlbseg.inferers import SliceResizeInferer

from .common import (
    FULL,
    benchmark_parser,
    build_network,
    finish,
    fmt_s,
    parse_benchmark_args,
    spread,
    start,
    time_inference,
)


def measure(args: argparse.Namespace) -> dict:
    """Figure (d): latency of ``args.runs`` whole-volume runs and slices per second."""
    device = torch.device(args.device)
    inferer = SliceResizeInferer(roi_size=(args.size, args.size))
    result = time_inference(build_network(2, args.features, device), inferer, args.volume, device, args.runs)
    return {
        "volume_shape": list(args.volume),
        "roi_size": [args.size, args.size],
        "sw_batch_size": inferer.sw_batch_size,
        **result,
        "slices_per_s": args.volume[-1] / result["latency_s"]["median"],
    }


def main(argv: Sequence[str] | None = None) -> dict:
    p = benchmark_parser(__doc__)
    p.add_argument("--volume", default=None, help=f"volume shape (default {FULL['volume']})")
    p.add_argument("--runs", type=int, default=None, help="timed volume runs (default 3)")
    args = parse_benchmark_args(p, argv, quick={"runs": 2}, full={"runs": 3})
    info = start(args)
    d = measure(args)
    print(
        f"\n(d) inference, SliceResizeInferer: volume {'x'.join(map(str, d['volume_shape']))}, roi {args.size}, "
        f"sw_batch_size {d['sw_batch_size']}: latency median {fmt_s(d['latency_s']['median'])} "
        f"{spread(d['latency_s']['samples'])}, {d['slices_per_s']:.1f} slices/s"
    )
    return finish(args, {"machine": info, "d_inference": d})


if __name__ == "__main__":
    main(sys.argv[1:])
