"""Benchmark scripts, run from the repository root as modules: `python -m benchmarks.engine`,
`python -m benchmarks.methods`, `python -m benchmarks.vision`, `python -m benchmarks.profile_engine`,
`python -m benchmarks.compare`."""
