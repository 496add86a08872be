"""WSGI entry point for other servers (`waitress-serve backend.wsgi:app`, `gunicorn backend.wsgi:app`).

`tessera serve` (and the Docker image) run the app under waitress through backend/serving.py instead, which
buffers request bodies before dispatch; a server in front that does not buffer them can be starved by slow
clients.
"""
from backend.app import create_app
from backend.serving import AccessLog
from backend.settings import Settings, configure_logging

settings = Settings.from_env()
configure_logging(settings.log_level)
app = AccessLog(create_app(settings))
