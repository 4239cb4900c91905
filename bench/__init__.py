"""Benchmarks of the whole stack against the simulator in strict mode: ``python -m bench``.

Each scenario starts what production runs (a fresh Postgres database, a flushed Redis
database, the simulator as its own OS process and real Celery worker processes), drives it
through the public API, the CLI and environment settings only, and measures the result from
the simulator's ``/stats`` and the Postgres attempts ledger. The runner writes the rows to
``BENCHMARKS.md``.
"""
