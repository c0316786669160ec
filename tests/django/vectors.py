"""Test vectors for sessiongate's Django signing format, made by real Django.

    python vectors.py generate > vectors.json   # tokens Django wrote (we decode them)
    python vectors.py verify < tokens.json      # Django decodes tokens sessiongate wrote

`verify` reads a JSON list of {"secret", "fallbacks", "salt", "token", "max_age"?} and
prints a JSON list of {"ok": true, "data": ...} or {"ok": false, "error": "..."}.
Run with the virtualenv made from requirements.txt.
"""

import json
import sys
from unittest import mock

import django
from django.conf import settings

settings.configure(SECRET_KEY="unused-placeholder-unused-placeholder")
django.setup()

from django.core import signing  # noqa: E402

SESSION_SALT = "django.contrib.sessions.SessionStore"
COOKIE_SALT = "django.contrib.sessions.backends.signed_cookies"
SECRET = "sessiongate-test-secret-0123456789-abcdefghijklmnop"
OLD_SECRET = "sessiongate-old-secret-9876543210-zyxwvutsrqponmlk"
EXPIRY_DATE = "2027-01-15T08:30:00+00:00"

PAYLOADS = [
    {},
    {"a": 1},
    {"_auth_user_id": "1", "_auth_user_backend": "django.contrib.auth.backends.ModelBackend",
     "_auth_user_hash": "0123456789abcdef"},
    {"cart": [1, 2, 3], "name": "\u00e9t\u00e9 \u2603 \U0001f600", "nested": {"x": None, "y": True}},
    {"big": "abc" * 400, "list": list(range(100))},
    {"_session_expiry": 300, "user": "ann"},
    {"_session_expiry": 0},
    {"_session_expiry": EXPIRY_DATE},
    {"float": 1.5, "neg": -7, "esc": "quote\" back\\ slash / tab\t nl\n"},
]


def dumps_at(data, secret, salt, ts):
    with mock.patch("django.core.signing.time.time", return_value=ts):
        return signing.dumps(data, key=secret, salt=salt, compress=True)


def generate():
    out = []
    ts = 1_790_000_000
    for i, data in enumerate(PAYLOADS):
        for salt in (SESSION_SALT, COOKIE_SALT):
            token = dumps_at(data, SECRET, salt, ts + i)
            out.append({"secret": SECRET, "salt": salt, "timestamp": ts + i,
                        "data": data, "token": token, "valid": True})
    # Signed with a key that is now a fallback: valid when it is listed.
    token = dumps_at({"old": "key"}, OLD_SECRET, SESSION_SALT, ts)
    out.append({"secret": SECRET, "fallbacks": [OLD_SECRET], "salt": SESSION_SALT,
                "timestamp": ts, "data": {"old": "key"}, "token": token, "valid": True})
    out.append({"secret": SECRET, "salt": SESSION_SALT, "timestamp": ts,
                "data": {"old": "key"}, "token": token, "valid": False,
                "why": "signed with a key that is not listed"})
    # The other salt: never valid for sessions.
    token = dumps_at({"a": 1}, SECRET, COOKIE_SALT, ts)
    out.append({"secret": SECRET, "salt": SESSION_SALT, "timestamp": ts, "data": {"a": 1},
                "token": token, "valid": False, "why": "another salt"})
    # Tampered payload, same signature.
    good = dumps_at({"user": "ann"}, SECRET, SESSION_SALT, ts)
    payload, stamp, sig = good.split(":")
    forged = dumps_at({"user": "bob"}, SECRET, SESSION_SALT, ts).split(":")[0]
    out.append({"secret": SECRET, "salt": SESSION_SALT, "timestamp": ts,
                "data": {"user": "bob"}, "token": f"{forged}:{stamp}:{sig}",
                "valid": False, "why": "payload swapped"})
    json.dump({"django": django.__version__, "vectors": out}, sys.stdout, indent=1,
              ensure_ascii=True)
    sys.stdout.write("\n")


def verify():
    results = []
    for item in json.load(sys.stdin):
        try:
            data = signing.loads(item["token"], key=item["secret"],
                                 fallback_keys=item.get("fallbacks", []),
                                 salt=item["salt"], max_age=item.get("max_age"))
            results.append({"ok": True, "data": data})
        except signing.BadSignature as e:
            results.append({"ok": False, "error": f"{type(e).__name__}: {e}"})
    json.dump(results, sys.stdout, ensure_ascii=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    {"generate": generate, "verify": verify}[sys.argv[1]]()
