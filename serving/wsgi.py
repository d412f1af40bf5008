"""gunicorn entry point: ``gunicorn serving.wsgi:app`` (config from the environment, once)."""

import gc

from serving.app import configure_logging, create_app
from serving.config import ServingConfig

config = ServingConfig.from_env()
configure_logging(config)
app = create_app(config)
# Everything allocated so far lives as long as the worker: keep it out of every GC pass.
gc.freeze()
