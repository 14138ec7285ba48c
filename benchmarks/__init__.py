"""Benchmarks: stablelayers against jax.nn, Flax/Equinox and PyTorch, side by side.

Run ``python -m benchmarks`` (full run, a few minutes, writes ``docs/benchmarks.md`` and
``docs/benchmarks.png``) or ``python -m benchmarks --quick`` (a smoke run in seconds, into a
temporary directory unless ``--out`` is given). See ``benchmarks/__main__.py``.
"""
