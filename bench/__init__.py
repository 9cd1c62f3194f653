"""Benchmarks: `make bench` (full) and `make bench-quick` (CI smoke test). Results go to
bench/results/*.json (raw samples and medians) and docs/benchmarks.md is regenerated from them."""
