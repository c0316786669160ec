//! Django's signing format against real Django: what sessiongate signs,
//! Django's `signing.loads` reads (and what Django signed, sessiongate
//! reads: `tests/django/vectors.json`, checked by the unit tests).

#[path = "common/django.rs"]
mod django;

use serde_json::{json, Value};
use sessiongate::store::db::django::{Signer, SESSION_SALT, SIGNED_COOKIES_SALT};

const SECRET: &str = "sessiongate-live-secret-0123456789-abcdefghijkl";
const OLD: &str = "sessiongate-live-old-secret-0123456789-abcdefgh";

#[test]
fn django_reads_what_sessiongate_signs() {
    let Some(py) = django::python() else { return };
    let payloads = [
        json!({}),
        json!({"cart": [1, 2, 3], "name": "\u{e9}t\u{e9} \u{2603} \u{1f600}"}),
        json!({"big": "xyz".repeat(500), "n": null, "t": true, "f": 1.5}),
        json!({"_auth_user_id": "7", "_session_expiry": 300}),
    ];
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let mut items = Vec::new();
    for salt in [SESSION_SALT, SIGNED_COOKIES_SALT] {
        let signer = Signer::new(salt, SECRET.as_bytes(), &[]);
        for p in &payloads {
            // ASCII JSON, as the engines sign it: Django decodes the payload as Latin-1.
            let text = sessiongate::session::json::to_ascii_vec(p);
            items.push(json!({"secret": SECRET, "salt": salt, "token": signer.dumps(&text, now), "max_age": 60}));
        }
    }
    // Signed under a key Django only has as a fallback.
    let old = Signer::new(SESSION_SALT, OLD.as_bytes(), &[]);
    let t = old.dumps(br#"{"old":1}"#, now);
    items.push(json!({"secret": SECRET, "fallbacks": [OLD], "salt": SESSION_SALT, "token": t}));
    // ... and without it listed: refused.
    items.push(json!({"secret": SECRET, "salt": SESSION_SALT, "token": t}));
    // Too old for max_age.
    let signer = Signer::new(SIGNED_COOKIES_SALT, SECRET.as_bytes(), &[]);
    items.push(json!({"secret": SECRET, "salt": SIGNED_COOKIES_SALT, "token": signer.dumps(b"{}", now - 100), "max_age": 10}));

    let out = django::run_script(
        &py,
        "vectors.py",
        &["verify"],
        &serde_json::to_vec(&items).unwrap(),
    );
    let results: Vec<Value> = serde_json::from_slice(&out).unwrap();
    assert_eq!(results.len(), items.len());
    for (i, p) in payloads.iter().chain(payloads.iter()).enumerate() {
        assert_eq!(
            results[i]["ok"], true,
            "{}: {}",
            items[i]["token"], results[i]
        );
        assert_eq!(&results[i]["data"], p);
    }
    let n = payloads.len() * 2;
    assert!(
        items[2]["token"].as_str().unwrap().starts_with('.'),
        "compressed"
    );
    assert_eq!(results[n]["data"], json!({"old": 1}));
    assert_eq!(results[n + 1]["ok"], false, "{}", results[n + 1]);
    assert_eq!(results[n + 2]["ok"], false);
    assert!(results[n + 2]["error"]
        .as_str()
        .unwrap()
        .contains("SignatureExpired"));
}
