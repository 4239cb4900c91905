"""The web process: OpenAI's Files and Batches API and the dashboard, on Starlette.

``python -m web`` (the Procfile's ``web``) serves :func:`web.app.create_app` with
uvicorn on ``$PORT``. It imports :mod:`jobs`, never :mod:`worker`: validation, ending
and webhooks run on the workers, reached through Celery tasks by name.

* :mod:`web.app`: the routes and their OpenAI-style errors;
* :mod:`web.auth`: bearer tokens (``API_KEYS``) for the API, HTTP Basic for browsers;
* :mod:`web.uploads`: a multipart upload streamed into Postgres as it arrives.
"""
