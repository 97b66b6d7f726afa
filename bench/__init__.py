"""Benchmarks: ``./dev bench`` lists them, ``./dev bench NAME`` runs one, ``./dev bench all`` runs every one.

Each module here has ``main() -> None`` and prints the comparison it makes (ours vs. the naive approach, in
the same run) with machine info. Results are recorded in docs/benchmarks.md.
"""
