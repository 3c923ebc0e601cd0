"""Benchmarks: the engine against hand-written asyncio, its peers and the machine's limit.

Run ``PYTHONPATH=. python -m bench`` (or ``python bench/run.py``); see :mod:`bench.run`.
Every figure is a ratio of two measurements taken side by side in the same run, because
absolute rates on a shared machine drift from one minute to the next.
"""
