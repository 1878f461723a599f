"""Experiments on MLB-Seg's results: real left-atrium MRI (``real_la``) and the fast modes' Dice.

Run each from the repository root, e.g. ``python -m benchmarks.experiments.real_la --quick --out /tmp/smoke``.
"""
