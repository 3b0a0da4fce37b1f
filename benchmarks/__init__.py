"""Speed and quality measurements of SG-MAE, run as `python -m benchmarks.NAME` from the repository root."""
