"""lisa_dist's benchmarks, run from the repository's root as `python -m benchmarks.NAME` (benchmarks/README.md).
Not part of the wheel: `harness` (arguments, machine, result files) and `lib` (what only benchmarks and tests use)."""
