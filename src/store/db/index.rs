//! The user index of the `db` engines (SPEC 9): a table of ours next to
//! Django's, never a change to `django_session` (Django shares it).
//!
//! ```sql
//! CREATE TABLE "sessiongate_user_session" (
//!     "user" text NULL,
//!     "session_key" varchar(40) NOT NULL PRIMARY KEY,
//!     "tail" text NULL);
//! CREATE INDEX "sessiongate_user_session_user" ON "sessiongate_user_session" ("user");
//! ```
//!
//! `tail` is the end of the `session_data` the entry was made from: the
//! row's HMAC signature (see [`TAIL`]), which changes with every write of
//! the row, so `tail <> right(session_data, 43)` finds a row written since.
//! `user` is NULL for a row that was looked at and names no user (or cannot
//! be read), so it is not decoded again until it changes.
//!
//! sessiongate writes it in the same transaction as the session row: every
//! write of a session that names a user upserts its entry, a write that
//! removes the user deletes it, Cycle-Key moves it, a delete removes it.
//! Django's own writes bypass it (a login through `django.contrib.auth`
//! writes a row sessiongate never saw), so every listing and revocation
//! first indexes the live rows that have no entry or whose data changed
//! since their entry was made ([`IndexSql::unindexed`], in batches of
//! [`BATCH`], each its own transaction): the first call after Django's
//! writes decodes those rows, the next finds none. A reader still never
//! trusts an entry alone: the row must exist, be live and name that user
//! (decoded), and entries that fail this are deleted (lazy repair). The
//! sweep deletes the entries of the rows it removes and of rows Django
//! deleted.
//!
//! An index table of an earlier schema (without `tail`) is dropped and made
//! again at start: it holds nothing the rows do not (the scan rebuilds it).

use crate::session::{Record, SessionKey};

/// Characters at the end of `session_data` kept in `tail`: a Django
/// signature (`signing.dumps`, HMAC-SHA256, unpadded base64) is 43.
pub const TAIL: usize = 43;

/// Rows indexed per transaction by the scan.
pub const BATCH: usize = 500;

/// The last [`TAIL`] characters of `data` (all of it when shorter), as
/// `substr(data, -43)` (SQLite) and `right(data, 43)` (PostgreSQL) count.
pub fn tail(data: &str) -> &str {
    match data.char_indices().rev().nth(TAIL - 1) {
        Some((i, _)) => &data[i..],
        None => data,
    }
}

/// The index table for the session table `table`.
pub fn table_name(table: &str) -> String {
    if table == "django_session" {
        "sessiongate_user_session".to_string()
    } else {
        format!("{table}_sessiongate_user")
    }
}

/// `CREATE ... IF NOT EXISTS` for the index (SQLite and PostgreSQL alike).
pub(super) fn create_sql(table: &str) -> String {
    let idx = table_name(table);
    format!(
        "CREATE TABLE IF NOT EXISTS \"{idx}\" (\"user\" text NULL, \"session_key\" varchar(40) NOT NULL PRIMARY KEY, \"tail\" text NULL);\n\
         CREATE INDEX IF NOT EXISTS \"{idx}_user\" ON \"{idx}\" (\"user\");"
    )
}

/// PostgreSQL: drops the index table when it has an earlier schema (no
/// `tail`), before [`create_sql`] makes it again.
pub(super) fn pg_drop_old_sql(table: &str) -> String {
    let idx = table_name(table);
    let lit = idx.replace('\'', "''");
    format!(
        "DO $$ BEGIN IF EXISTS (SELECT 1 FROM information_schema.tables WHERE table_schema = current_schema() AND table_name = '{lit}') \
         AND NOT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema() AND table_name = '{lit}' AND column_name = 'tail') \
         THEN DROP TABLE \"{idx}\"; END IF; END $$;"
    )
}

/// The statements, with `?N` (SQLite) or `$N` (PostgreSQL) parameters.
pub(crate) struct IndexSql {
    /// ("user" or NULL, session_key, tail)
    pub upsert: String,
    /// (session_key)
    pub delete: String,
    /// (user) -> session_key
    pub keys_of: String,
    /// (expire_date): entries of the rows the sweep is about to remove.
    pub clear: String,
    /// Entries whose row is gone (Django deleted it).
    pub orphans: String,
    /// (now) -> session_key, session_data, expire_date: at most [`BATCH`]
    /// live rows with no entry, or whose data changed since their entry.
    pub unindexed: String,
}

impl IndexSql {
    pub(super) fn new(table: &str, dollar: bool) -> IndexSql {
        let idx = table_name(table);
        let p = |n: u8| {
            if dollar {
                format!("${n}")
            } else {
                format!("?{n}")
            }
        };
        let (right, differs) = if dollar {
            (format!("right(s.session_data, {TAIL})"), "IS DISTINCT FROM")
        } else {
            (format!("substr(s.session_data, -{TAIL})"), "IS NOT")
        };
        IndexSql {
            upsert: format!(
                "INSERT INTO \"{idx}\" (\"user\", session_key, tail) VALUES ({}, {}, {}) ON CONFLICT (session_key) DO UPDATE SET \"user\" = excluded.\"user\", tail = excluded.tail",
                p(1),
                p(2),
                p(3)
            ),
            delete: format!("DELETE FROM \"{idx}\" WHERE session_key = {}", p(1)),
            keys_of: format!("SELECT session_key FROM \"{idx}\" WHERE \"user\" = {}", p(1)),
            clear: format!(
                "DELETE FROM \"{idx}\" WHERE session_key IN (SELECT session_key FROM \"{table}\" WHERE expire_date < {})",
                p(1)
            ),
            orphans: format!(
                "DELETE FROM \"{idx}\" WHERE NOT EXISTS (SELECT 1 FROM \"{table}\" s WHERE s.session_key = \"{idx}\".session_key)"
            ),
            unindexed: format!(
                "SELECT s.session_key, s.session_data, s.expire_date FROM \"{table}\" s LEFT JOIN \"{idx}\" i ON i.session_key = s.session_key WHERE s.expire_date > {} AND (i.session_key IS NULL OR i.tail {differs} {right}) LIMIT {BATCH}",
                p(1)
            ),
        }
    }
}

/// What a write does to the index.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct IndexWrite {
    /// Delete the entry of this key.
    pub delete: Option<SessionKey>,
    /// Upsert (user, key).
    pub upsert: Option<(String, SessionKey)>,
}

/// The index changes for a write that turned `old` (under `old_key`) into
/// `new` (under `new_key`; another key after Cycle-Key).
pub(crate) fn plan(
    user_key: &str,
    old_key: &SessionKey,
    old: &Record,
    new_key: &SessionKey,
    new: &Record,
) -> IndexWrite {
    let old_user = crate::store::user_of(&old.data, user_key);
    let new_user = crate::store::user_of(&new.data, user_key);
    let moved = old_key != new_key;
    IndexWrite {
        // The entry may be there even when the decoded row names no user
        // (an upsert before Django rewrote the row): deleted when the key
        // goes away or loses its user.
        delete: (moved || (new_user.is_none() && old_user.is_some())).then_some(*old_key),
        upsert: new_user.map(|u| (u, *new_key)),
    }
}

/// The entry for a new record.
pub(crate) fn plan_create(user_key: &str, key: &SessionKey, r: &Record) -> IndexWrite {
    IndexWrite {
        delete: None,
        upsert: crate::store::user_of(&r.data, user_key).map(|u| (u, *key)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_support::{record, T0};

    #[test]
    fn writes_follow_the_user() {
        let (k1, k2) = (SessionKey::generate(), SessionKey::generate());
        let none = record(T0, "cart", 1);
        let u1 = record(T0, "uid", 1);
        let u2 = record(T0, "uid", "2");
        // First login, same user again (upserted: heals a row Django wrote),
        // another user, user key removed, Cycle-Key.
        assert_eq!(
            plan("uid", &k1, &none, &k1, &u1),
            IndexWrite {
                delete: None,
                upsert: Some(("1".into(), k1))
            }
        );
        assert_eq!(
            plan("uid", &k1, &u1, &k1, &u1).upsert,
            Some(("1".into(), k1))
        );
        assert_eq!(
            plan("uid", &k1, &u1, &k1, &u2).upsert,
            Some(("2".into(), k1))
        );
        assert_eq!(
            plan("uid", &k1, &u1, &k1, &none),
            IndexWrite {
                delete: Some(k1),
                upsert: None
            }
        );
        assert_eq!(plan("uid", &k1, &none, &k1, &none), IndexWrite::default());
        assert_eq!(
            plan("uid", &k1, &u1, &k2, &u1),
            IndexWrite {
                delete: Some(k1),
                upsert: Some(("1".into(), k2))
            }
        );
        assert_eq!(plan_create("uid", &k2, &none), IndexWrite::default());
        assert_eq!(table_name("django_session"), "sessiongate_user_session");
        assert_eq!(table_name("s"), "s_sessiongate_user");
        let sig = "x".repeat(TAIL);
        assert_eq!(tail(&format!(".eJw:1tZ:{sig}")), sig);
        assert_eq!(tail("short"), "short");
        assert_eq!(tail(&format!("é{sig}")), sig, "characters, not bytes");
    }
}
