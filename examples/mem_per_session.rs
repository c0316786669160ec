//! Resident memory per stored session in the `memory` engine.
//!
//! Stores N sessions (default 1,000,000) of a typical ~100-byte payload in a
//! `MemoryStore`, the way the proxy creates them (a new record, the
//! upstream's `X-Session-Update` applied as a patch, `Store::create`), and
//! reads the resident set size from `/proc/self/statm` before and after.
//! Prints bytes per session in total, minus the payload, and minus the
//! payload and the 32-byte key.
//!
//! With `--user-key K` the store keeps the index of a user's sessions
//! under `K` (`[session] user_key`, SPEC 9): `--user-key _auth_user_id`
//! indexes every session under its own user (the payload's ids differ).
//!
//! Run: `cargo run --release --example mem_per_session [-- N] [--user-key K]`
//! (Linux only).

use std::time::Instant;

use http::{HeaderName, HeaderValue};
use sessiongate::session::{Patch, Policy, Record};
use sessiongate::store::{MemoryStore, Store};

/// Page size of `/proc/self/statm` (x86_64 and aarch64 Linux with 4 KiB pages;
/// cross-checked against `VmRSS` below).
const PAGE: u64 = 4096;

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm (Linux)");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("resident field of statm");
    pages * PAGE
}

fn vm_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// A typical payload: a logged-in user with a small cart, about 100 bytes
/// of canonical JSON; the user id varies so no two sessions are equal.
fn update_header(i: u64) -> HeaderValue {
    let v = format!(
        r#"{{"_auth_user_id": "{:07}", "username": "user{:07}", "cart": ["tea", "milk"], "lang": "en", "visits": 3}}"#,
        i % 10_000_000,
        i % 10_000_000
    );
    HeaderValue::from_str(&v).expect("ascii")
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let user_key = args
        .iter()
        .position(|a| a == "--user-key")
        .map(|i| args.get(i + 1).expect("--user-key K").clone());
    let n: u64 = args
        .iter()
        .find(|a| a.starts_with(|c: char| c.is_ascii_digit()))
        .map(|a| {
            a.replace(['_', ','], "")
                .parse()
                .expect("N: a number of sessions")
        })
        .unwrap_or(1_000_000);
    let policy = Policy {
        cookie_age_secs: 14 * 86_400,
        expire_at_browser_close: false,
        absolute_timeout_ms: 0,
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("tokio runtime");
    let name = HeaderName::from_static("x-session-update");

    let store = MemoryStore::new().with_user_key(user_key.clone());
    let before = resident_bytes();
    let rss_before = vm_rss_kib();
    let started = Instant::now();
    let mut payload_bytes: u64 = 0;
    rt.block_on(async {
        for i in 0..n {
            let value = update_header(i);
            let patch = Patch::parse([(&name, &value)]).expect("valid directive");
            let mut record = Record::new_at(now);
            record.apply_patch(&patch, now, &policy);
            payload_bytes += record.data.len() as u64;
            store.create(record).await.expect("memory store");
        }
    });
    let elapsed = started.elapsed();
    let after = resident_bytes();
    let rss_after = vm_rss_kib();
    assert_eq!(store.len() as u64, n);

    let grown = after.saturating_sub(before) as f64;
    let per = grown / n as f64;
    let payload = payload_bytes as f64 / n as f64;
    let key = sessiongate::session::key::KEY_LEN as f64;
    println!("sessions stored:                {n}");
    println!(
        "user index:                     {}",
        match &user_key {
            Some(k) => format!("on (user_key {k:?}, {} entries)", store.user_index_len()),
            None => "off".into(),
        }
    );
    println!("fill time:                      {elapsed:.2?}");
    println!("payload (stored JSON), mean:    {payload:.1} bytes");
    println!(
        "resident before / after:        {:.1} MiB / {:.1} MiB (statm, {PAGE}-byte pages)",
        before as f64 / 1048576.0,
        after as f64 / 1048576.0
    );
    if let (Some(b), Some(a)) = (rss_before, rss_after) {
        println!(
            "VmRSS before / after:           {:.1} MiB / {:.1} MiB (cross-check)",
            b as f64 / 1024.0,
            a as f64 / 1024.0
        );
    }
    println!("bytes/session, total:           {per:.1}");
    println!("bytes/session, minus payload:   {:.1}", per - payload);
    println!(
        "bytes/session, minus payload and 32-byte key: {:.1}",
        per - payload - key
    );
    println!(
        "layout: size_of::<Record>() = {}, size_of::<SessionKey>() = {}",
        std::mem::size_of::<Record>(),
        std::mem::size_of::<sessiongate::session::SessionKey>()
    );
    // Keep the store alive until after the measurement.
    drop(store);
}
