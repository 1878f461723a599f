#!/usr/bin/env python
"""
Inference throughput and whole-volume latency of :py:class:`monai_mlbseg.inferers.SliceResizeInferer` (figure (d) of
``docs/benchmarks.md``): eval mode, ``no_grad``, a synthetic volume of the left atrium's size, after one warm-up run.

Usage::

    python benchmarks/inference.py                   # NestedUNet 16..256, 144 px, volume 200x140x88
    python benchmarks/inference.py --device cuda --features 64,128,256,512,1024
    python benchmarks/inference.py --quick           # tiny smoke configuration
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import torch
from common import build_network, fmt_s, machine_info, print_machine, spread, time_inference

from monai_mlbseg.inferers import SliceResizeInferer


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


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available, else cpu")
    p.add_argument("--features", default=None, help="NestedUNet widths (default 16,32,64,128,256)")
    p.add_argument("--size", type=int, default=None, help="slice size (default 144)")
    p.add_argument("--volume", default=None, help="volume shape (default 200,140,88)")
    p.add_argument("--runs", type=int, default=None, help="timed volume runs (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default 2; --quick: 1)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--quick", action="store_true", help="tiny smoke configuration")
    args = p.parse_args(argv)
    defaults = (
        {"features": "4,8,16", "size": 32, "volume": "40,30,8", "runs": 2, "threads": 1}
        if args.quick
        else {"features": "16,32,64,128,256", "size": 144, "volume": "200,140,88", "runs": 3, "threads": 2}
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.features = tuple(int(v) for v in str(args.features).split(",") if v.strip())
    args.volume = tuple(int(v) for v in str(args.volume).split(",") if v.strip())
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine_info(torch.device(args.device), args.threads)
    print_machine(info)
    d = measure(args)
    print(
        f"\n(d) inference, SliceResizeInferer: volume {'x'.join(map(str, d['volume_shape']))}, roi {args.size}, "
        f"sw_batch_size {d['sw_batch_size']}: latency median {fmt_s(d['latency_s']['median'])} "
        f"{spread(d['latency_s']['samples'])}, {d['slices_per_s']:.1f} slices/s"
    )
    out = {"machine": info, "d_inference": d}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, default=str)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
