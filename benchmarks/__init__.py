"""annify's benchmarks: run each from the repository root as ``python -m benchmarks.bench_NAME``.

``_common`` holds what they share; ``sweeps/`` the long studies (every timm model, Table 1, trained
start) with their own results. Tests never import anything from here.
"""
