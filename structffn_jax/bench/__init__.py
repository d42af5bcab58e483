"""Benchmarks, each runnable as `python -m structffn_jax.bench.<name>`; see BENCHMARKS.md."""
