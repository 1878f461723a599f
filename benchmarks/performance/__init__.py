"""Cost of MLB-Seg on synthetic data: one script per figure of ``docs/benchmarks.md`` and the prepared GPU check.

Run each from the repository root, e.g. ``python -m benchmarks.performance.iteration_cost --quick``.
"""
