"""Celery side: app, tasks, throttle and model client."""
