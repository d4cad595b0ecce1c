"""Benchmarks (run from the README): throughput and ratios against baselines measured in the same run."""
