//! The upstream's `X-Session-*` response headers, parsed into a [`Patch`].
//!
//! A patch is applied in a fixed order whatever the order of the headers:
//! Flush, Cycle-Key, Replace, Clear, Update, Delete, Expiry, then the user
//! directives (Logout-Others, Logout-User: SPEC 9). Flush and Cycle-Key act
//! on the key and are carried out by the caller and the store;
//! [`Patch::apply_data`] does the data on the newest stored state; the user
//! directives are carried out by the caller after the save, against the
//! user as the session then names it.

use http::{HeaderName, HeaderValue};
use serde_json::{Map, Value};

use super::Expiry;

/// A directive the upstream got wrong: names the header and the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{header}: {problem}")]
pub struct DirectiveError {
    pub header: &'static str,
    pub problem: String,
}

fn err(header: &'static str, problem: impl Into<String>) -> DirectiveError {
    DirectiveError {
        header,
        problem: problem.into(),
    }
}

/// The changes an upstream response asks for.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Patch {
    pub flush: bool,
    pub cycle: bool,
    pub replace: Option<Map<String, Value>>,
    pub clear: bool,
    /// Every `X-Session-Update` object merged in header order.
    pub update: Map<String, Value>,
    pub has_update: bool,
    pub delete: Vec<String>,
    pub expiry: Option<Expiry>,
    /// `X-Session-Logout-Others: 1`: end the user's other sessions.
    pub logout_others: bool,
    /// `X-Session-Logout-User: V`, each V as text (a JSON string as is, a
    /// number as its JSON text).
    pub logout_users: Vec<String>,
}

pub const UPDATE: &str = "X-Session-Update";
pub const DELETE: &str = "X-Session-Delete";
pub const REPLACE: &str = "X-Session-Replace";
pub const CLEAR: &str = "X-Session-Clear";
pub const FLUSH: &str = "X-Session-Flush";
pub const CYCLE_KEY: &str = "X-Session-Cycle-Key";
pub const EXPIRY: &str = "X-Session-Expiry";
pub const LOGOUT_OTHERS: &str = "X-Session-Logout-Others";
pub const LOGOUT_USER: &str = "X-Session-Logout-User";

impl Patch {
    /// True when the response carried no directive at all.
    pub fn is_empty(&self) -> bool {
        !self.flush
            && !self.cycle
            && self.replace.is_none()
            && !self.clear
            && !self.has_update
            && self.delete.is_empty()
            && self.expiry.is_none()
            && !self.ends_sessions()
    }

    /// Whether the patch ends other sessions (the section 9 directives).
    pub fn ends_sessions(&self) -> bool {
        self.logout_others || !self.logout_users.is_empty()
    }

    /// Parses the `X-Session*` headers of a response (names lower-case, as
    /// `http` gives them). Headers that are not directives (for example an
    /// echoed `X-Session-Id`) are ignored.
    pub fn parse<'a, I>(headers: I) -> Result<Patch, DirectiveError>
    where
        I: IntoIterator<Item = (&'a HeaderName, &'a HeaderValue)>,
    {
        let mut p = Patch::default();
        for (name, value) in headers {
            match name.as_str() {
                "x-session-update" => {
                    let m = parse_object(UPDATE, value)?;
                    p.has_update = true;
                    for (k, v) in m {
                        p.update.insert(k, v);
                    }
                }
                "x-session-delete" => p.delete.extend(parse_key_list(value)?),
                "x-session-replace" => p.replace = Some(parse_object(REPLACE, value)?),
                "x-session-clear" => p.clear |= parse_flag(CLEAR, value)?,
                "x-session-flush" => p.flush |= parse_flag(FLUSH, value)?,
                "x-session-cycle-key" => p.cycle |= parse_flag(CYCLE_KEY, value)?,
                "x-session-expiry" => p.expiry = Some(parse_expiry(value)?),
                "x-session-logout-others" => p.logout_others |= parse_flag(LOGOUT_OTHERS, value)?,
                "x-session-logout-user" => p.logout_users.push(parse_user(value)?),
                _ => {}
            }
        }
        Ok(p)
    }

    /// Applies Replace, Clear, Update, Delete and Expiry, in that order, to
    /// `data` and `expiry`. Returns whether the session counts as modified
    /// (Django's `session.modified`): a Delete of an absent key or an expiry
    /// of `none` on a session without one changes nothing.
    pub fn apply_data(&self, data: &mut Map<String, Value>, expiry: &mut Expiry) -> bool {
        let mut modified = false;
        // Django keeps the custom expiry inside the data, so clearing or
        // replacing the data returns to the global expiry policy.
        if let Some(r) = &self.replace {
            *data = r.clone();
            *expiry = Expiry::Default;
            modified = true;
        }
        if self.clear {
            data.clear();
            *expiry = Expiry::Default;
            modified = true;
        }
        if self.has_update {
            for (k, v) in &self.update {
                data.insert(k.clone(), v.clone());
            }
            modified = true;
        }
        for k in &self.delete {
            modified |= data.remove(k).is_some();
        }
        if let Some(e) = self.expiry {
            if e != Expiry::Default || *expiry != Expiry::Default {
                modified = true;
            }
            *expiry = e;
        }
        modified
    }

    /// Whether applying this patch needs the stored data (a Replace or Clear
    /// alone does not; the memory engine uses this to skip a parse).
    pub fn touches_data(&self) -> bool {
        self.replace.is_some() || self.clear || self.has_update || !self.delete.is_empty()
    }
}

fn text<'a>(header: &'static str, v: &'a HeaderValue) -> Result<&'a str, DirectiveError> {
    std::str::from_utf8(v.as_bytes())
        .map(str::trim)
        .map_err(|_| err(header, "not valid UTF-8"))
}

fn parse_object(
    header: &'static str,
    v: &HeaderValue,
) -> Result<Map<String, Value>, DirectiveError> {
    match serde_json::from_slice::<Value>(v.as_bytes()) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(other) => Err(err(
            header,
            format!("expected a JSON object, got {}", kind(&other)),
        )),
        Err(e) => Err(err(header, format!("invalid JSON: {e}"))),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn parse_key_list(v: &HeaderValue) -> Result<Vec<String>, DirectiveError> {
    let t = text(DELETE, v)?;
    // An object is an upstream's mistake (Update's form), not a key name:
    // a name that starts with `{` is sent as a JSON string.
    if t.starts_with('{') {
        return Err(err(
            DELETE,
            "expected key names (a comma-separated list, a JSON array of strings or a JSON string), found `{` (an object is Update's form; a key name that starts with `{` goes as a JSON string)",
        ));
    }
    if t.starts_with('"') {
        return match serde_json::from_str::<String>(t) {
            Ok(k) => Ok(vec![k]),
            Err(e) => Err(err(DELETE, format!("invalid JSON string: {e}"))),
        };
    }
    if t.starts_with('[') {
        return match serde_json::from_str::<Value>(t) {
            Ok(Value::Array(items)) => items
                .into_iter()
                .map(|i| match i {
                    Value::String(s) => Ok(s),
                    other => Err(err(
                        DELETE,
                        format!("expected an array of strings, found {}", kind(&other)),
                    )),
                })
                .collect(),
            Ok(_) => Err(err(DELETE, "expected an array of strings")),
            Err(e) => Err(err(DELETE, format!("invalid JSON: {e}"))),
        };
    }
    Ok(t.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect())
}

/// A user as `X-Session-Logout-User` names one: a JSON string or number.
fn parse_user(v: &HeaderValue) -> Result<String, DirectiveError> {
    let t = text(LOGOUT_USER, v)?;
    match serde_json::from_str::<Value>(t) {
        Ok(Value::String(s)) => Ok(s),
        Ok(Value::Number(n)) => Ok(n.to_string()),
        Ok(other) => Err(err(
            LOGOUT_USER,
            format!("expected a JSON string or number, got {}", kind(&other)),
        )),
        Err(_) => Err(err(
            LOGOUT_USER,
            format!(
                "{:?} is not a JSON string or number (quote a name: \"alice\")",
                truncate(t)
            ),
        )),
    }
}

fn parse_flag(header: &'static str, v: &HeaderValue) -> Result<bool, DirectiveError> {
    match text(header, v)? {
        "1" | "true" | "True" | "TRUE" => Ok(true),
        "0" | "false" | "False" | "FALSE" => Ok(false),
        other => Err(err(
            header,
            format!("expected 1 (or true), got {:?}", truncate(other)),
        )),
    }
}

fn parse_expiry(v: &HeaderValue) -> Result<Expiry, DirectiveError> {
    let t = text(EXPIRY, v)?;
    if t.eq_ignore_ascii_case("none") {
        return Ok(Expiry::Default);
    }
    if let Ok(n) = t.parse::<i64>() {
        if n < 0 {
            return Err(err(
                EXPIRY,
                format!("negative seconds {n}: use a date in the past or X-Session-Flush"),
            ));
        }
        if n > 100 * 365 * 86400 {
            return Err(err(EXPIRY, format!("{n} seconds is more than 100 years")));
        }
        return Ok(if n == 0 {
            Expiry::BrowserClose
        } else {
            Expiry::Seconds(n)
        });
    }
    match time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339) {
        // Cookie dates end with year 9999 (RFC 6265 / IMF-fixdate).
        Ok(d) if d.unix_timestamp() > MAX_COOKIE_SECS => Err(err(
            EXPIRY,
            format!("{:?} is after the year 9999", truncate(t)),
        )),
        Ok(d) => Ok(Expiry::At((d.unix_timestamp_nanos() / 1_000_000) as i64)),
        Err(_) => Err(err(
            EXPIRY,
            format!(
                "{:?} is not seconds, 0, none or an RFC 3339 date",
                truncate(t)
            ),
        )),
    }
}

/// 9999-12-31T23:59:59Z, the last instant an IMF-fixdate can express.
pub const MAX_COOKIE_SECS: i64 = 253_402_300_799;

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(pairs: &[(&str, &str)]) -> Result<Patch, DirectiveError> {
        let hs: Vec<(HeaderName, HeaderValue)> = pairs
            .iter()
            .map(|(n, v)| {
                (
                    HeaderName::from_bytes(n.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                )
            })
            .collect();
        Patch::parse(hs.iter().map(|(n, v)| (n, v)))
    }

    fn run(p: &Patch, start: Value) -> (Value, Expiry, bool) {
        let mut m = start.as_object().unwrap().clone();
        let mut e = Expiry::Default;
        let modified = p.apply_data(&mut m, &mut e);
        (Value::Object(m), e, modified)
    }

    #[test]
    fn user_directives_name_users_as_text() {
        let p = parse(&[
            ("x-session-logout-user", r#""alice""#),
            ("x-session-logout-user", "42"),
            ("x-session-logout-others", "1"),
        ])
        .unwrap();
        assert_eq!(p.logout_users, vec!["alice", "42"]);
        assert!(p.logout_others && p.ends_sessions() && !p.is_empty());
        for bad in ["alice", "null", "[1]", r#"{"u":1}"#, "true", ""] {
            let e = parse(&[("x-session-logout-user", bad)]).unwrap_err();
            assert_eq!(e.header, LOGOUT_USER, "{bad:?}");
        }
        let e = parse(&[("x-session-logout-others", "yes")]).unwrap_err();
        assert_eq!(e.header, LOGOUT_OTHERS);
        assert!(parse(&[("x-session-logout-others", "0")])
            .unwrap()
            .is_empty());
    }

    #[test]
    fn updates_merge_in_header_order() {
        let p = parse(&[
            ("x-session-update", r#"{"a":1,"b":1}"#),
            ("x-session-update", r#"{"b":2}"#),
        ])
        .unwrap();
        assert_eq!(run(&p, json!({"c":0})).0, json!({"a":1,"b":2,"c":0}));
    }

    #[test]
    fn fixed_order_whatever_the_header_order() {
        // Delete comes after Update, Update after Clear, Clear after Replace.
        let p = parse(&[
            ("x-session-delete", "a"),
            ("x-session-update", r#"{"a":1,"b":2}"#),
            ("x-session-clear", "1"),
            ("x-session-replace", r#"{"r":1}"#),
        ])
        .unwrap();
        assert_eq!(run(&p, json!({"x":1})).0, json!({"b":2}));
    }

    #[test]
    fn delete_forms() {
        let p = parse(&[("x-session-delete", "a, b ,c")]).unwrap();
        assert_eq!(p.delete, vec!["a", "b", "c"]);
        let p = parse(&[("x-session-delete", r#"["a,b", "c"]"#)]).unwrap();
        assert_eq!(p.delete, vec!["a,b", "c"]);
        let p = parse(&[("x-session-delete", r#""a""#)]).unwrap();
        assert_eq!(p.delete, vec!["a"]);
        assert!(parse(&[("x-session-delete", r#"[1]"#)]).is_err());
        let bad = parse(&[("x-session-delete", r#"{"a":1}"#)]).unwrap_err();
        assert!(bad.to_string().contains("found `{`"), "{bad}");
        let p = parse(&[("x-session-delete", r#""{a}""#)]).unwrap();
        assert_eq!(p.delete, vec!["{a}"]);
        let (_, _, modified) = run(
            &parse(&[("x-session-delete", "zz")]).unwrap(),
            json!({"a":1}),
        );
        assert!(!modified, "popping an absent key does not modify (Django)");
    }

    #[test]
    fn expiry_forms() {
        let e = |v: &str| parse(&[("x-session-expiry", v)]).map(|p| p.expiry.unwrap());
        assert_eq!(e("300").unwrap(), Expiry::Seconds(300));
        assert_eq!(e("0").unwrap(), Expiry::BrowserClose);
        assert_eq!(e("none").unwrap(), Expiry::Default);
        assert_eq!(e("None").unwrap(), Expiry::Default);
        assert_eq!(
            e("2030-01-01T00:00:00Z").unwrap(),
            Expiry::At(1_893_456_000_000)
        );
        assert_eq!(
            e("2030-01-01T01:00:00+01:00").unwrap(),
            Expiry::At(1_893_456_000_000)
        );
        let bad = e("tomorrow").unwrap_err();
        assert_eq!(bad.header, EXPIRY);
        assert!(bad.to_string().starts_with("X-Session-Expiry: "));
        assert!(e("-5").is_err());
        assert!(
            e("9999-12-31T23:59:59-23:59").is_err(),
            "past year 9999 in UTC"
        );
        assert!(e("9999-12-31T23:59:59Z").is_ok());
    }

    #[test]
    fn malformed_directives_name_the_header() {
        let cases = [
            ("x-session-update", "{not json", UPDATE),
            ("x-session-update", "[1,2]", UPDATE),
            ("x-session-replace", "\"str\"", REPLACE),
            ("x-session-clear", "yes please", CLEAR),
            ("x-session-flush", "2", FLUSH),
            ("x-session-cycle-key", "maybe", CYCLE_KEY),
        ];
        for (n, v, header) in cases {
            let e = parse(&[(n, v)]).unwrap_err();
            assert_eq!(e.header, header, "{n}: {v}");
        }
        let e = parse(&[("x-session-update", "[1]")]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "X-Session-Update: expected a JSON object, got an array"
        );
    }

    #[test]
    fn flags_and_echoes() {
        let p = parse(&[
            ("x-session-flush", "1"),
            ("x-session-cycle-key", "true"),
            ("x-session-id", "whatever"),
            ("x-session", "{}"),
        ])
        .unwrap();
        assert!(p.flush && p.cycle);
        assert!(parse(&[("x-session-new", "true")]).unwrap().is_empty());
        assert!(!parse(&[("x-session-clear", "0")]).unwrap().clear);
    }

    #[test]
    fn clear_and_replace_return_to_the_global_expiry() {
        let p = parse(&[("x-session-clear", "1")]).unwrap();
        let mut m = Map::new();
        let mut e = Expiry::BrowserClose;
        p.apply_data(&mut m, &mut e);
        assert_eq!(e, Expiry::Default);
        let p = parse(&[("x-session-replace", "{}"), ("x-session-expiry", "60")]).unwrap();
        let mut e = Expiry::BrowserClose;
        p.apply_data(&mut m, &mut e);
        assert_eq!(
            e,
            Expiry::Seconds(60),
            "an Expiry in the same response still applies"
        );
    }

    #[test]
    fn expiry_none_on_default_is_not_a_change() {
        let p = parse(&[("x-session-expiry", "none")]).unwrap();
        assert!(!run(&p, json!({})).2);
        let p = parse(&[("x-session-expiry", "60")]).unwrap();
        let (_, e, m) = run(&p, json!({}));
        assert!(m);
        assert_eq!(e, Expiry::Seconds(60));
    }
}
