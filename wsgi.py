"""gunicorn and `flask --app wsgi` entry point."""

from webapp import create_app

app = create_app()
