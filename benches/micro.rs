//! Micro-benchmarks of the per-request pieces of sessiongate.
//!
//! Run: `cargo bench --bench micro` (all), or filter by name, e.g.
//! `cargo bench --bench micro -- memory_store`. While other work shares the
//! machine, shorten the runs: `-- --warm-up-time 1 --measurement-time 2`.
//!
//! Groups:
//! - `directives`: `Patch::parse` of a response's `X-Session-*` headers and
//!   `Record::apply_patch` (Update + Delete; Replace);
//! - `cookie`: `cookie::set` (Set-Cookie), `cookie::find` and `cookie::strip`
//!   on a typical `Cookie` header, and the signed-cookie codec
//!   (`SignedCookies::encode`/`decode`, encrypted and signed-only);
//! - `headers`: `session::headers::inject` (the added request fields in
//!   wire form) for a typical (~10 keys, ~200 bytes) and a 4 KB session;
//! - `route`: `Router::find` with 100 routes (hosts and prefixes): the last
//!   route, and a miss;
//! - `memory_store`: `load` and `apply` on a `MemoryStore` holding 1,000,000
//!   sessions (filled once, outside the timed loop).

use std::future::Future;
use std::hint::black_box;
use std::path::Path;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use http::header::{HeaderMap, HeaderName, HeaderValue};

use sessiongate::config::{Config, SessionConfig};
use sessiongate::proxy::route::Router;
use sessiongate::session::headers::{inject, Added, View};
use sessiongate::session::{cookie, json, Patch, Policy, Record, SessionKey};
use sessiongate::store::{Applied, MemoryStore, SignedCookies, Store, WriteCtx};

const SECRET: &str = "benchmark-secret-key-0123456789abcdef";
/// A fixed "now" (2025-01-01T00:00:00Z) so runs are comparable.
const NOW: i64 = 1_735_689_600_000;

fn config(routes: &str) -> Config {
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ntls = false\n\
         [session]\nsecret_key = \"{SECRET}\"\n{routes}"
    );
    Config::parse(&text, Path::new("bench.toml")).expect("bench config")
}

fn session_config() -> SessionConfig {
    config("[[route]]\nupstream = \"http://127.0.0.1:9000\"\n").session
}

fn policy() -> Policy {
    Policy::from_config(&session_config())
}

/// A typical session: 10 keys, about 200 bytes of JSON (a logged-in user
/// with a small cart).
fn typical_data() -> serde_json::Map<String, serde_json::Value> {
    let v = serde_json::json!({
        "_auth_user_id": "4217",
        "_auth_user_backend": "app.auth.Backend",
        "_auth_user_hash": "5d41402abc4b2a76b9719d911017c592",
        "username": "alice",
        "cart": ["tea", "milk"],
        "coupon": "SPRING",
        "lang": "en",
        "theme": "dark",
        "visits": 17,
        "last_seen": 1735689600
    });
    v.as_object().unwrap().clone()
}

/// A large session: about 4 KB of JSON.
fn large_data() -> serde_json::Map<String, serde_json::Value> {
    let mut m = typical_data();
    let mut i = 0;
    while json::encode_object(&m).len() < 4096 - 48 {
        m.insert(
            format!("item_{i:03}"),
            serde_json::Value::String(format!("sku-{i:05}-a-product-description")),
        );
        i += 1;
    }
    m
}

fn record_with(data: &serde_json::Map<String, serde_json::Value>) -> Record {
    let p = policy();
    let mut r = Record::new_at(NOW);
    r.data = json::encode_object(data);
    r.touch(NOW, &p);
    r
}

fn header_pairs(pairs: &[(&str, &str)]) -> Vec<(HeaderName, HeaderValue)> {
    pairs
        .iter()
        .map(|(n, v)| {
            (
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            )
        })
        .collect()
}

/// Polls a future that completes without waiting (the memory store's
/// futures never yield): measures the store, not an executor.
fn ready<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("the memory store yielded"),
    }
}

fn directives(c: &mut Criterion) {
    let p = policy();
    let mut g = c.benchmark_group("directives");
    // What the proxy hands to Patch::parse: the X-Session-* headers it took
    // out of a response.
    let typical = header_pairs(&[
        (
            "x-session-update",
            r#"{"cart": ["tea", "milk", "sugar"], "last_seen": 1735689660}"#,
        ),
        ("x-session-delete", "coupon"),
    ]);
    let replace = header_pairs(&[(
        "x-session-replace",
        r#"{"_auth_user_id": "4217", "username": "alice", "lang": "en"}"#,
    )]);
    let record = record_with(&typical_data());

    g.bench_function("parse/update+delete", |b| {
        b.iter(|| Patch::parse(black_box(&typical).iter().map(|(n, v)| (n, v))).unwrap())
    });
    g.bench_function("parse/replace", |b| {
        b.iter(|| Patch::parse(black_box(&replace).iter().map(|(n, v)| (n, v))).unwrap())
    });

    let patch = Patch::parse(typical.iter().map(|(n, v)| (n, v))).unwrap();
    g.bench_function("apply/update+delete", |b| {
        b.iter_batched_ref(
            || record.clone(),
            |r| r.apply_patch(black_box(&patch), NOW + 1000, &p),
            BatchSize::SmallInput,
        )
    });
    let patch_r = Patch::parse(replace.iter().map(|(n, v)| (n, v))).unwrap();
    g.bench_function("apply/replace", |b| {
        b.iter_batched_ref(
            || record.clone(),
            |r| r.apply_patch(black_box(&patch_r), NOW + 1000, &p),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("parse+apply/update+delete", |b| {
        b.iter_batched_ref(
            || record.clone(),
            |r| {
                let patch = Patch::parse(black_box(&typical).iter().map(|(n, v)| (n, v))).unwrap();
                r.apply_patch(&patch, NOW + 1000, &p)
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn cookies(c: &mut Criterion) {
    let sc = session_config();
    let key = SessionKey::generate();
    let mut g = c.benchmark_group("cookie");
    g.bench_function("set/persistent", |b| {
        b.iter(|| cookie::set(&sc, black_box(key.as_str()), Some(1_209_600), NOW))
    });
    g.bench_function("set/browser_close", |b| {
        b.iter(|| cookie::set(&sc, black_box(key.as_str()), None, NOW))
    });

    let mut req = HeaderMap::new();
    req.insert(
        http::header::COOKIE,
        HeaderValue::from_str(&format!(
            "csrftoken=8f2b1c3d4e5f60718293a4b5c6d7e8f9; sessionid={}; _ga=GA1.1.123456789.1735689600",
            key.as_str()
        ))
        .unwrap(),
    );
    g.bench_function("find", |b| {
        b.iter(|| cookie::find(black_box(&req), "sessionid").map(SessionKey::parse_bytes))
    });
    g.bench_function("strip", |b| {
        b.iter_batched_ref(
            || req.clone(),
            |h| cookie::strip(h, "sessionid"),
            BatchSize::SmallInput,
        )
    });

    let record = record_with(&typical_data());
    for encrypt in [true, false] {
        let codec = SignedCookies::new("sessionid", SECRET.as_bytes(), &[], encrypt);
        let label = if encrypt { "encrypted" } else { "signed" };
        let token = codec.encode(&key, &record);
        assert!(codec.decode(token.as_bytes(), NOW).is_some());
        g.throughput(Throughput::Bytes(record.data.len() as u64));
        g.bench_function(format!("signed_encode/{label}"), |b| {
            b.iter(|| codec.encode(black_box(&key), black_box(&record)))
        });
        g.bench_function(format!("signed_decode/{label}"), |b| {
            b.iter(|| codec.decode(black_box(token.as_bytes()), NOW).unwrap())
        });
    }
    g.finish();
}

fn headers(c: &mut Criterion) {
    let p = policy();
    let ids = sessiongate::session::key::IdKey::new(SECRET.as_bytes());
    let key = SessionKey::generate();
    let mut g = c.benchmark_group("headers");
    for (label, data) in [("typical", typical_data()), ("4k", large_data())] {
        let record = record_with(&data);
        g.throughput(Throughput::Bytes(record.data.len() as u64));
        let view = View {
            key: Some(&key),
            record: Some(&record),
            is_new: false,
        };
        g.bench_function(format!("inject/{label}"), |b| {
            b.iter_batched_ref(
                || Added::with_capacity(1024),
                |h| inject(h, black_box(&view), NOW, &p, &ids, &[], None),
                BatchSize::SmallInput,
            )
        });
    }
    // With one `forward` header, which makes inject parse the stored JSON.
    let record = record_with(&typical_data());
    let view = View {
        key: Some(&key),
        record: Some(&record),
        is_new: false,
    };
    let forward = vec![(HeaderName::from_static("x-user"), "username".to_string())];
    g.throughput(Throughput::Bytes(record.data.len() as u64));
    g.bench_function("inject/typical+forward", |b| {
        b.iter_batched_ref(
            || Added::with_capacity(1024),
            |h| inject(h, black_box(&view), NOW, &p, &ids, &forward, None),
            BatchSize::SmallInput,
        )
    });
    let empty = View {
        key: None,
        record: None,
        is_new: true,
    };
    g.throughput(Throughput::Elements(1));
    g.bench_function("inject/new_session", |b| {
        b.iter_batched_ref(
            || Added::with_capacity(1024),
            |h| inject(h, black_box(&empty), NOW, &p, &ids, &[], None),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn routes(c: &mut Criterion) {
    // 100 routes: 50 virtual hosts with one prefix each, 50 host-less prefixes.
    let mut text = String::new();
    for i in 0..100 {
        if i % 2 == 0 {
            text.push_str(&format!(
                "[[route]]\nname = \"r{i}\"\nhost = \"h{i}.example.com\"\npath = \"/app{i}\"\nupstream = \"http://127.0.0.1:9000\"\n"
            ));
        } else {
            text.push_str(&format!(
                "[[route]]\nname = \"r{i}\"\npath = \"/svc{i}/api\"\nupstream = \"http://127.0.0.1:9000\"\n"
            ));
        }
    }
    let router = Router::new(config(&text).routes);
    assert_eq!(router.routes.len(), 100);
    assert_eq!(
        router
            .find(Some("h98.example.com:8443"), "/app98/x/y")
            .map(|r| r.cfg.name.as_str()),
        Some("r98")
    );
    assert_eq!(
        router
            .find(Some("www.example.com"), "/svc99/api/users/7")
            .map(|r| r.cfg.name.as_str()),
        Some("r99")
    );
    assert!(router.find(Some("www.example.com"), "/nowhere/x").is_none());

    let mut g = c.benchmark_group("route");
    g.bench_function("100/last_host_route", |b| {
        b.iter(|| {
            router.find(
                black_box(Some("h98.example.com:8443")),
                black_box("/app98/x/y"),
            )
        })
    });
    g.bench_function("100/last_prefix_route", |b| {
        b.iter(|| {
            router.find(
                black_box(Some("www.example.com")),
                black_box("/svc99/api/users/7"),
            )
        })
    });
    g.bench_function("100/miss", |b| {
        b.iter(|| router.find(black_box(Some("www.example.com")), black_box("/nowhere/x")))
    });
    g.finish();
}

const SESSIONS: usize = 1_000_000;

fn memory_store(c: &mut Criterion) {
    let p = policy();
    let store = MemoryStore::new();
    // Filled as the proxy does it: a new record, an Update patch, create.
    let text = json::encode_object(&typical_data());
    let text = std::str::from_utf8(&text).unwrap();
    let fill = Patch::parse(
        header_pairs(&[("x-session-update", text)])
            .iter()
            .map(|(n, v)| (n, v)),
    )
    .unwrap();
    let started = std::time::Instant::now();
    let mut keys = Vec::with_capacity(SESSIONS);
    for _ in 0..SESSIONS {
        let mut r = Record::new_at(NOW);
        r.apply_patch(&fill, NOW, &p);
        keys.push(ready(store.create(r)).unwrap());
    }
    eprintln!(
        "memory_store: {} sessions stored in {:.1?}",
        store.len(),
        started.elapsed()
    );
    // Visit keys in a scrambled order so lookups do not walk memory in
    // insertion order (a prime stride over the key list).
    let stride = 7_919usize;
    let mut i = 0usize;
    let mut next = move || {
        i = (i + stride) % SESSIONS;
        i
    };

    let mut g = c.benchmark_group("memory_store_1m");
    g.bench_function("load/hit", |b| {
        b.iter(|| {
            let k = &keys[next()];
            ready(store.load(black_box(k), NOW)).unwrap().unwrap()
        })
    });
    let unknown = SessionKey::generate();
    g.bench_function("load/miss", |b| {
        b.iter(|| ready(store.load(black_box(&unknown), NOW)).unwrap())
    });
    let update = Patch::parse(
        header_pairs(&[("x-session-update", r#"{"visits": 18}"#)])
            .iter()
            .map(|(n, v)| (n, v)),
    )
    .unwrap();
    let mut now = NOW;
    g.bench_function("apply/update", |b| {
        b.iter(|| {
            now += 1;
            let ctx = WriteCtx {
                now,
                policy: p,
                touch: false,
                refresh_ms: 0,
                max_size: 0,
            };
            let k = &keys[next()];
            let a = ready(store.apply(k, black_box(&update), ctx)).unwrap();
            debug_assert!(matches!(a, Applied::Saved { .. }));
            a
        })
    });
    g.bench_function("apply/unchanged", |b| {
        let nothing = Patch::default();
        b.iter(|| {
            let ctx = WriteCtx {
                now,
                policy: p,
                touch: false,
                refresh_ms: 0,
                max_size: 0,
            };
            let k = &keys[next()];
            ready(store.apply(k, black_box(&nothing), ctx)).unwrap()
        })
    });
    g.finish();
    assert_eq!(store.len(), SESSIONS);
}

criterion_group!(benches, directives, cookies, headers, routes, memory_store);
criterion_main!(benches);
