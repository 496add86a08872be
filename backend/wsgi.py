"""gunicorn entry point: `gunicorn 'backend.wsgi:app'` (what `tessera serve` and the Docker image run)."""
from backend.app import create_app
from backend.settings import Settings, configure_logging

settings = Settings.from_env()
configure_logging(settings.log_level)
app = create_app(settings)
