"""``python -m web``: the web process (the Procfile's ``web``), uvicorn on ``$PORT``.

1. Read the settings once and resolve them (:func:`jobs.environment.resolve`): on a
   dyno every service and ``API_KEYS`` must be set, or the process stops with one
   line; off a dyno the dev stack fills what is unset, and a local key is kept in
   ``VAR_DIR/api.key`` (its path is printed, never the key).
2. Check PostgreSQL (its schema at head) and Redis, retrying for
   ``SERVICE_WAIT_SECONDS`` as a worker does.
3. Serve :func:`web.app.create_app` with uvicorn, every log line logfmt.
"""

from __future__ import annotations

import os
import sys

import uvicorn

from jobs import environment, logfmt
from jobs.environment import ServiceError
from jobs.settings import ConfigError, Settings
from web.app import create_app

#: Port when ``PORT`` is unset (Heroku always sets it on a web dyno).
DEFAULT_PORT = 8000


def _log_retry(error: ServiceError, seconds_left: float) -> None:
    logfmt.log_event("service_wait", error=str(error), gives_up_in_s=round(seconds_left))


def main() -> int:
    try:
        settings = Settings.from_env()
        logfmt.configure(dyno=settings.dyno)
        settings = environment.resolve(settings, inference=False, web=True)
        environment.wait_for_services(settings, on_retry=_log_retry)
        port = int(os.environ.get("PORT") or DEFAULT_PORT)
    except (ConfigError, ServiceError, ValueError) as exc:
        sys.stderr.write(f"batch-infer: error: {' '.join(str(exc).split())}\n")
        return 2
    logfmt.log_event("web_started", port=port, url=f"http://127.0.0.1:{port}/")
    uvicorn.run(
        create_app(settings),
        host="0.0.0.0",  # noqa: S104 - a dyno's router reaches it on any interface
        port=port,
        log_config=None,
        proxy_headers=True,
        forwarded_allow_ips="*",
        timeout_graceful_shutdown=20,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
