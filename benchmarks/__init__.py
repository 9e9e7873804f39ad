"""Benchmarks of resilient_http, run on demand (``python -m benchmarks.overhead``, ``python -m benchmarks.chaos``).

They are not timed tests: ``benchmarks/test_smoke.py`` only runs each one in
its ``--smoke`` mode to keep it from rotting, and never asserts on speed.
Results, and the commands that produced them, are in ``benchmarks/RESULTS.md``.
"""
