//! The admin listener (SPEC 7.2): plain HTTP on `[admin] listen`, apart
//! from the proxy's listeners. `/healthz`, `/readyz` (a store ping within
//! `store.timeout`) and `/metrics`; it serves no route, and the proxy's
//! listeners serve none of these paths (they are routed like any other).
//!
//! The sessions API (SPEC 9), with `Authorization: Bearer <token>`:
//! `GET /sessions?user=V` lists a user's live sessions as JSON,
//! `DELETE /sessions?user=V` and `DELETE /sessions/ID` (ID: the session's
//! `X-Session-Id`) end sessions and answer `{"deleted": N}`. Without
//! `[admin] token` the sessions API answers 403; without `[session]
//! user_key`, 409. No answer and no log line carries a session key.
//! `POST /reload` and the sessions API follow a reload's new token.

pub mod client;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use arc_swap::ArcSwap;
use subtle::ConstantTimeEq;

use crate::config::{Config, Engine};
use crate::metrics::{DeleteReason, Metrics, StoreOp};
use crate::session::key::IdKey;
use crate::session::{Clock, SessionKey};
use crate::store::{AnyStore, Store, UserSession};

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("[admin] cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// What the admin endpoints read.
pub struct Admin {
    metrics: Arc<Metrics>,
    store: Arc<AnyStore>,
    engine: Engine,
    timeout: Duration,
    /// The proxy's clock (tests move it).
    clock: Clock,
    /// What a reload may change: the token, the secret behind the
    /// `X-Session-Id`s, the user key.
    live: ArcSwap<Live>,
    /// What `POST /reload` runs (`sessiongate reload`): the server's reload.
    reload: std::sync::OnceLock<ReloadFn>,
}

/// The part of the configuration the admin endpoints follow across reloads.
struct Live {
    /// SHA-256 of `[admin] token`: compared in constant time with the hash
    /// of the presented one, so neither the bytes nor the length leak.
    token: Option<[u8; 32]>,
    /// The proxy's `X-Session-Id` key (from `secret_key`).
    ids: IdKey,
    /// Whether `[session] user_key` is set.
    user_key: bool,
}

impl Live {
    fn of(config: &Config) -> Live {
        Live {
            token: config
                .admin
                .as_ref()
                .and_then(|a| a.token.as_deref())
                .map(sha256),
            ids: IdKey::new(&config.session.secret_key),
            user_key: config.session.user_key.is_some(),
        }
    }
}

fn sha256(b: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, b);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Whether the request's `Authorization: Bearer` is the token whose hash is
/// `want` (constant time).
fn bearer_ok(req: &Request<Incoming>, want: &[u8; 32]) -> bool {
    let Some(given) = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes())
    else {
        return false;
    };
    // RFC 9110 11.1: the scheme is case-insensitive, one or more spaces
    // before the token.
    let Some((scheme, rest)) = given.split_at_checked(6) else {
        return false;
    };
    if !scheme.eq_ignore_ascii_case(b"Bearer") || !rest.starts_with(b" ") {
        return false;
    }
    let token = rest.trim_ascii_start();
    bool::from(sha256(token).ct_eq(want))
}

/// The admin paths, each with the methods it answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Healthz,
    Readyz,
    Metrics,
    Reload,
    /// `/sessions?user=V`
    Sessions,
    /// `/sessions/ID`
    SessionById,
}

impl Endpoint {
    fn of(path: &str) -> Option<Endpoint> {
        Some(match path {
            "/healthz" => Endpoint::Healthz,
            "/readyz" => Endpoint::Readyz,
            "/metrics" => Endpoint::Metrics,
            "/reload" => Endpoint::Reload,
            "/sessions" => Endpoint::Sessions,
            p if p.starts_with("/sessions/") => Endpoint::SessionById,
            _ => return None,
        })
    }

    /// The `Allow` field of a `405`.
    fn allow(self) -> &'static str {
        match self {
            Endpoint::Healthz | Endpoint::Readyz | Endpoint::Metrics => "GET, HEAD",
            Endpoint::Reload => "POST",
            Endpoint::Sessions => "GET, HEAD, DELETE",
            Endpoint::SessionById => "DELETE",
        }
    }

    fn allows(self, method: &Method) -> bool {
        let get = *method == Method::GET || *method == Method::HEAD;
        match self {
            Endpoint::Healthz | Endpoint::Readyz | Endpoint::Metrics => get,
            Endpoint::Reload => *method == Method::POST,
            Endpoint::Sessions => get || *method == Method::DELETE,
            Endpoint::SessionById => *method == Method::DELETE,
        }
    }
}

/// The 401 of a missing or wrong token.
fn unauthorized() -> Response<Full<Bytes>> {
    let mut r = text(
        StatusCode::UNAUTHORIZED,
        "the admin token is required (Authorization: Bearer <[admin] token>)\n".into(),
    );
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

/// Reloads the configuration: `Ok` names the file the server re-read
/// (its own, whichever file `sessiongate reload` was given), `Err`
/// carries the logged message.
pub type ReloadFn = Box<dyn Fn() -> Result<String, String> + Send + Sync>;

impl Admin {
    pub fn new(
        config: &Config,
        store: Arc<AnyStore>,
        metrics: Arc<Metrics>,
        clock: Clock,
    ) -> Admin {
        Admin {
            metrics,
            store,
            engine: config.store.engine,
            timeout: config.store.timeout,
            clock,
            live: ArcSwap::from_pointee(Live::of(config)),
            reload: std::sync::OnceLock::new(),
        }
    }

    /// Follows a reloaded configuration: its token, `secret_key` and
    /// `user_key` (the listener and the store stay).
    pub fn configure(&self, config: &Config) {
        self.live.store(Arc::new(Live::of(config)));
    }

    /// Connects `POST /reload` to the server's reload (once).
    pub fn set_reload(&self, f: ReloadFn) {
        let _ = self.reload.set(f);
    }

    /// Serves one admin request: an unknown path is `404` whatever the
    /// method, a known one asked with another method `405` naming the
    /// right ones (`HEAD` goes wherever `GET` does).
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let Some(endpoint) = Endpoint::of(req.uri().path()) else {
            return text(
                StatusCode::NOT_FOUND,
                "not an admin path (/healthz, /readyz, /metrics, /reload, /sessions)\n".into(),
            );
        };
        if !endpoint.allows(req.method()) {
            let allow = endpoint.allow();
            let mut r = text(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{}: {allow} only\n", req.uri().path()),
            );
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allow));
            return r;
        }
        match endpoint {
            Endpoint::Healthz => text(StatusCode::OK, "ok\n".into()),
            Endpoint::Readyz => self.ready().await,
            Endpoint::Metrics => {
                let mut r = Response::new(Full::new(Bytes::from(self.metrics.encode())));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
                );
                r
            }
            Endpoint::Reload => self.reload(&req).await,
            Endpoint::Sessions | Endpoint::SessionById => self.sessions(&req).await,
        }
    }

    /// `POST /reload`: the same reload as SIGHUP, its outcome in the answer.
    async fn reload(self: Arc<Self>, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        if let Some(t) = self.live.load().token {
            if !bearer_ok(req, &t) {
                return unauthorized();
            }
        }
        let this = self.clone();
        let outcome = tokio::task::spawn_blocking(move || match this.reload.get() {
            Some(f) => f(),
            None => Err("this server cannot reload".into()),
        })
        .await
        .unwrap_or_else(|e| Err(format!("reload failed: {e}")));
        match outcome {
            Ok(file) => text(
                StatusCode::OK,
                format!("configuration reloaded from {file}\n"),
            ),
            Err(e) => text(StatusCode::CONFLICT, format!("{e}\n")),
        }
    }

    /// The sessions API (SPEC 9): `GET /sessions?user=V`,
    /// `DELETE /sessions?user=V`, `DELETE /sessions/ID`.
    async fn sessions(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        let live = self.live.load_full();
        let Some(token) = live.token else {
            return text(
                StatusCode::FORBIDDEN,
                "the sessions API needs [admin] token (or token_file) in sessiongate's config\n"
                    .into(),
            );
        };
        if !bearer_ok(req, &token) {
            return unauthorized();
        }
        let by_id = req.uri().path().strip_prefix("/sessions/");
        let method = req.method();
        if !live.user_key {
            return text(
                StatusCode::CONFLICT,
                "the sessions API needs [session] user_key in sessiongate's config (no index of a user's sessions is kept without it)\n"
                    .into(),
            );
        }
        let now = self.clock.now_ms();
        if let Some(id) = by_id {
            let Some(id) = parse_id(id) else {
                return text(
                    StatusCode::BAD_REQUEST,
                    "DELETE /sessions/ID: ID must be a session's X-Session-Id (32 lower-case hex digits)\n"
                        .into(),
                );
            };
            let ids = live.ids.clone();
            let matches = move |k: &SessionKey| k.public_id_hex(&ids) == id;
            let result = self
                .timed(
                    Some(StoreOp::Revoke),
                    self.store.revoke_matching(&matches, now),
                )
                .await;
            return self.deleted(result, "id");
        }
        let user = match query_user(req.uri().query()) {
            Ok(u) => u,
            Err(msg) => return text(StatusCode::BAD_REQUEST, format!("{msg}\n")),
        };
        if method == Method::DELETE {
            let result = self
                .timed(
                    Some(StoreOp::Revoke),
                    self.store.revoke_user(&user, None, now),
                )
                .await;
            return self.deleted(result, "user");
        }
        match self.timed(None, self.store.user_sessions(&user, now)).await {
            Ok(list) => {
                let items: Vec<serde_json::Value> = list
                    .iter()
                    .filter(|s| s.expires_at > now)
                    .map(|s| listed(s, &live.ids))
                    .collect();
                json(StatusCode::OK, &serde_json::Value::Array(items))
            }
            Err(e) => self.store_failed(&e),
        }
    }

    /// A store call of the sessions API within `store.timeout`; a
    /// revocation is timed as `op="revoke"`.
    async fn timed<T>(
        &self,
        op: Option<StoreOp>,
        f: impl std::future::Future<Output = Result<T, crate::store::StoreError>>,
    ) -> Result<T, crate::store::StoreError> {
        let start = Instant::now();
        let r = tokio::time::timeout(self.timeout, f).await;
        if let Some(op) = op {
            self.metrics.store_op(op).observe(start.elapsed());
        }
        match r {
            Ok(r) => r,
            Err(_) => Err(crate::store::StoreError::Unavailable(format!(
                "no answer within {:?}",
                self.timeout
            ))),
        }
    }

    fn deleted(
        &self,
        result: Result<u64, crate::store::StoreError>,
        by: &'static str,
    ) -> Response<Full<Bytes>> {
        match result {
            Ok(n) => {
                self.metrics.sessions_deleted(DeleteReason::Revoked, n);
                tracing::info!(by, deleted = n, "sessions API: sessions revoked");
                json(StatusCode::OK, &serde_json::json!({ "deleted": n }))
            }
            Err(e) => self.store_failed(&e),
        }
    }

    fn store_failed(&self, e: &crate::store::StoreError) -> Response<Full<Bytes>> {
        let engine = self.engine.name();
        self.metrics.store_errors.inc();
        tracing::warn!(engine, error = %e, "sessions API: the store failed");
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("store {engine}: {e}\n"),
        )
    }

    async fn ready(&self) -> Response<Full<Bytes>> {
        let engine = self.engine.name();
        let start = Instant::now();
        let result = tokio::time::timeout(self.timeout, self.store.ping()).await;
        self.metrics
            .store_op(StoreOp::Ping)
            .observe(start.elapsed());
        match result {
            Ok(Ok(())) => text(StatusCode::OK, format!("ready: store {engine} answers\n")),
            Ok(Err(e)) => {
                self.metrics.store_errors.inc();
                tracing::warn!(engine, error = %e, "readyz: the store failed its ping");
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: store {engine}: {e}\n"),
                )
            }
            Err(_) => {
                self.metrics.store_errors.inc();
                tracing::warn!(engine, "readyz: the store did not answer its ping in time");
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "not ready: store {engine} did not answer a ping within {:?}\n",
                        self.timeout
                    ),
                )
            }
        }
    }
}

/// A session as `GET /sessions` lists it: its `X-Session-Id`, never its key.
fn listed(s: &UserSession, ids: &IdKey) -> serde_json::Value {
    let id = s.key.public_id_hex(ids);
    serde_json::json!({
        "id": std::str::from_utf8(&id).unwrap_or_default(),
        "created": rfc3339(s.created),
        "last_write": rfc3339(s.last_write),
        "expires": rfc3339(s.expires_at),
    })
}

/// Unix ms as RFC 3339 UTC, to the second (`2026-12-02T03:04:05Z`).
pub fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000))
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// An `X-Session-Id`: 32 lower-case hex digits.
fn parse_id(s: &str) -> Option<[u8; 32]> {
    let b = s.as_bytes();
    if b.len() != 32 || !b.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(b);
    Some(out)
}

/// The `user` parameter of a query string, percent-decoded (`+` is a
/// space, as in a form).
fn query_user(query: Option<&str>) -> Result<String, String> {
    const NEED: &str = "/sessions needs ?user=V (the value of [session] user_key, percent-encoded)";
    let mut found = None;
    for pair in query.unwrap_or("").split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k != "user" {
            continue;
        }
        if found.is_some() {
            return Err("/sessions: give user once".into());
        }
        let v = v.replace('+', " ");
        let v = percent_encoding::percent_decode_str(&v)
            .decode_utf8()
            .map_err(|_| "/sessions: user is not UTF-8 once percent-decoded".to_string())?;
        found = Some(v.into_owned());
    }
    match found {
        Some(u) if !u.is_empty() => Ok(u),
        _ => Err(NEED.into()),
    }
}

fn json(status: StatusCode, v: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut body = serde_json::to_vec(v).unwrap_or_default();
    body.push(b'\n');
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Binds `addr` (port 0 picks a free one) with `SO_REUSEPORT`, as the
/// main listener: a new process started beside the old one for a binary
/// upgrade can bind it too.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, AdminError> {
    crate::server::listen_reuseport(addr, 128).map_err(|source| AdminError::Bind { addr, source })
}

/// Serves the admin endpoints on `listener` until the task is aborted.
pub fn spawn(listener: TcpListener, admin: Arc<Admin>) -> tokio::task::JoinHandle<()> {
    if let Ok(a) = listener.local_addr() {
        tracing::info!(addr = %a, "admin listener: /healthz /readyz /metrics /sessions");
    }
    tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let admin = admin.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let admin = admin.clone();
                    async move { Ok::<_, Infallible>(admin.handle(req).await) }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .header_read_timeout(Duration::from_secs(10))
                    .timer(hyper_util::rt::TokioTimer::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await
                {
                    tracing::debug!(%peer, error = %e, "admin connection ended");
                }
            });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_user_is_percent_decoded_and_required() {
        assert_eq!(query_user(Some("user=alice")).unwrap(), "alice");
        assert_eq!(query_user(Some("x=1&user=a%20b%2Bc")).unwrap(), "a b+c");
        assert_eq!(query_user(Some("user=a+b")).unwrap(), "a b");
        assert_eq!(query_user(Some("user=%C3%A9")).unwrap(), "\u{e9}");
        for bad in [None, Some(""), Some("user="), Some("u=1"), Some("user=%FF")] {
            assert!(query_user(bad).is_err(), "{bad:?}");
        }
        assert!(query_user(Some("user=a&user=b")).is_err());
    }

    #[test]
    fn ids_are_32_lower_case_hex_digits() {
        assert!(parse_id("0123456789abcdef0123456789abcdef").is_some());
        for bad in [
            "",
            "0123",
            "0123456789ABCDEF0123456789abcdef",
            "0123456789abcdef0123456789abcdeg",
        ] {
            assert!(parse_id(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_796_180_645_999), "2026-12-02T03:04:05Z");
    }
}
