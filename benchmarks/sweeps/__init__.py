"""The long sweeps, hours each: every timm model (``bench_breadth``), the paper's Table 1
(``bench_table1``), from a trained network (``bench_trained_start``). Results in ``sweeps/results/``.

Run from the repository root: ``python -m benchmarks.sweeps.bench_table1 --config cpu --jobs 2``.
"""
