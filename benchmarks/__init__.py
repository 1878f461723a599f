"""MLB-Seg's benchmarks: cost figures (``benchmarks.performance``) and experiments (``benchmarks.experiments``)."""
