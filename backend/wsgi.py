"""gunicorn entry point: `gunicorn 'backend.wsgi:app'` (what `tessera serve` and the Docker image run)."""
import logging

from backend.app import create_app
from backend.settings import Settings

settings = Settings.from_env()
logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
app = create_app(settings)
