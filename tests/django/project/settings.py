"""A small Django project that shares its sessions with sessiongate (tests).

Configured from the environment:
  SG_DATABASE    sqlite file path, or postgres://user:pw@host:port/name
  SG_SECRET_KEY  = sessiongate's [session] secret_key
  SG_SECRET_KEY_FALLBACKS  comma-separated, optional
"""

import os
from urllib.parse import urlparse

SECRET_KEY = os.environ["SG_SECRET_KEY"]
SECRET_KEY_FALLBACKS = [k for k in os.environ.get("SG_SECRET_KEY_FALLBACKS", "").split(",") if k]
DEBUG = False
ALLOWED_HOSTS = ["*"]
USE_TZ = True
TIME_ZONE = "UTC"
ROOT_URLCONF = "urls"
INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django.contrib.sessions",
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
]
SESSION_ENGINE = os.environ.get("SG_SESSION_ENGINE", "django.contrib.sessions.backends.db")
SESSION_COOKIE_NAME = "sessionid"
SESSION_COOKIE_AGE = 1209600
# Tests only: a fast hasher, so creating and logging in a user takes no second.
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

_db = os.environ["SG_DATABASE"]
if _db.startswith(("postgres://", "postgresql://")):
    _u = urlparse(_db)
    DATABASES = {"default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": _u.path.lstrip("/"), "USER": _u.username or "", "PASSWORD": _u.password or "",
        "HOST": _u.hostname or "", "PORT": str(_u.port or ""),
    }}
else:
    DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": _db}}
