"""WSGI entry point for other servers (`waitress-serve tessera.backend.wsgi:app`, `gunicorn tessera.backend.wsgi:app`).

`tessera serve` (and the Docker image) run the app under waitress through backend/serving.py instead, which
buffers request bodies before dispatch; a server in front that does not buffer them can be starved by slow
clients.
"""
from tessera.backend.settings import Settings, apply_memory_policy, apply_thread_policy, configure_logging

settings = Settings.from_env()
apply_thread_policy(settings)           # before backend.app imports torch
apply_memory_policy(settings)

from tessera.backend.app import create_app      # noqa: E402
from tessera.backend.serving import AccessLog   # noqa: E402

configure_logging(settings.log_level)
app = AccessLog(create_app(settings))
