"""WSGI entry point: ``gunicorn -c gunicorn.conf.py`` serves ``djapp.wsgi:application``."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "djapp.settings")
application = get_wsgi_application()
