"""Django's own SessionStore on the shared database, for the tests.

    python session_tool.py read KEY       -> {"exists", "data", "expiry_age", "expire_date",
                                              "browser_close", "row": {"expire_date": raw text}}
    python session_tool.py create JSON [EXPIRY]  -> {"key"}   (EXPIRY: an int or an ISO date)
    python session_tool.py update KEY JSON      -> {}
    python session_tool.py flush KEY / cycle KEY -> {"key"}
    python session_tool.py schema        -> {"sql": [...]}  the table's CREATE statements (SQLite)
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "settings")
import django  # noqa: E402

django.setup()

from django.contrib.sessions.backends.db import SessionStore  # noqa: E402
from django.db import connection  # noqa: E402


def raw_expire_date(key):
    with connection.cursor() as c:
        c.execute("SELECT expire_date FROM django_session WHERE session_key = %s", [key])
        row = c.fetchone()
        return None if row is None else str(row[0])


def main():
    cmd = sys.argv[1]
    out = {}
    if cmd == "read":
        s = SessionStore(session_key=sys.argv[2])
        s._session_cache = s.load()  # missing, expired or badly signed: {} and no key
        exists = s.session_key is not None
        data = dict(s.items())
        out = {"exists": exists, "data": data, "expiry_age": s.get_expiry_age(),
               "expire_date": s.get_expiry_date().isoformat(),
               "browser_close": s.get_expire_at_browser_close(),
               "raw_expire_date": raw_expire_date(sys.argv[2])}
    elif cmd == "create":
        s = SessionStore()
        s.update(json.loads(sys.argv[2]))
        if len(sys.argv) > 3:
            v = sys.argv[3]
            if v.lstrip("-").isdigit():
                s.set_expiry(int(v))
            else:
                from datetime import datetime
                s.set_expiry(datetime.fromisoformat(v))
        s.save()
        out = {"key": s.session_key, "raw_expire_date": raw_expire_date(s.session_key)}
    elif cmd == "update":
        s = SessionStore(session_key=sys.argv[2])
        s.update(json.loads(sys.argv[3]))
        s.save()
    elif cmd == "flush":
        s = SessionStore(session_key=sys.argv[2])
        s.load()
        s.flush()
        out = {"key": s.session_key}
    elif cmd == "cycle":
        s = SessionStore(session_key=sys.argv[2])
        s._session_cache = s.load()
        s.cycle_key()
        out = {"key": s.session_key}
    elif cmd == "schema":
        with connection.cursor() as c:
            c.execute("SELECT sql FROM sqlite_master WHERE tbl_name = 'django_session' "
                      "AND sql IS NOT NULL ORDER BY type DESC, name")
            out = {"sql": [r[0] for r in c.fetchall()]}
    json.dump(out, sys.stdout, ensure_ascii=True, default=str)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
