"""gunicorn and `flask --app wsgi` entry point."""

from webapp import ConfigurationError, create_app

try:
    app = create_app()
except ConfigurationError as exc:  # one clear line for the operator rather than a traceback
    raise SystemExit(f"papertag cannot start: {exc}") from None
