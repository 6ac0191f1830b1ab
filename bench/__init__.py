"""Benchmarks: each writes its figures as JSON to bench/results/ (python -m bench.NAME)."""
