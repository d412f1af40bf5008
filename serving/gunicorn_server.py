"""`recsys serve`'s gunicorn: gunicorn's own command line, with settings read as attributes.

    python -m serving.gunicorn_server serving.wsgi:app --config python:serving.gunicorn_conf ...

The same options, settings files, hooks, workers and signals as ``python -m gunicorn``
(`gunicorn.app.wsgiapp.WSGIApplication`, its documented "custom application" extension
point); one thing differs: the configuration object is `Settings`.

gunicorn reads its settings per request as attributes of its `gunicorn.config.Config`
(``cfg.limit_request_line``, ``cfg.secure_scheme_headers``, ``cfg.strip_header_spaces`` per
header, ... about 26 reads a request in 26.2's sync worker). `Config` answers them in
``__getattr__``, which Python calls only after the ordinary lookup has failed, so each read
first builds and raises an AttributeError with its formatted message: ~200k of the ~670k
instructions a sync worker spends on a trivial request (callgrind, `serve_instructions.py`).
`Settings` declares every known setting as a property of the class, so the ordinary lookup
finds it and returns ``settings[name].get()``: the same value, without the exception.
`tests/serving/test_gunicorn_server.py` checks every setting reads alike through both classes
and that the server starts and answers through this entry point.
"""

from __future__ import annotations

from gunicorn.app.wsgiapp import WSGIApplication
from gunicorn.config import KNOWN_SETTINGS, Config


class Settings(Config):
    """gunicorn's `Config` with each known setting a property (see the module docstring)."""


def _setting(name: str) -> property:
    return property(lambda self: self.settings[name].get(), doc=f"gunicorn setting {name!r}")


for _known in KNOWN_SETTINGS:
    # (the names `Config` already derives itself, e.g. `is_ssl`, `worker_class`, stay its own)
    if not hasattr(Config, _known.name):
        setattr(Settings, _known.name, _setting(_known.name))


class Application(WSGIApplication):
    """``gunicorn``'s WSGI application runner whose configuration is a `Settings`."""

    def load_default_config(self) -> None:
        self.cfg = Settings(self.usage, prog=self.prog)


def run() -> None:
    """``gunicorn [OPTIONS] [APP_MODULE]``, as `gunicorn.app.wsgiapp.run`."""
    Application("%(prog)s [OPTIONS] [APP_MODULE]", prog="gunicorn").run()


if __name__ == "__main__":
    run()
