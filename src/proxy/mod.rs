//! The request path: route -> load the session -> clean and enrich the
//! request -> forward -> take the upstream's directives -> apply them as a
//! patch -> Set-Cookie -> respond.

pub mod error;
pub(crate) mod h1;
pub mod headers;
pub mod path;
pub mod route;
pub mod upstream;
pub mod upstream_tls;

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use serde_json::{Map, Value};

use crate::access_log::{AccessLog, Entry};
use crate::config::{AccessLogFormat, Config, SessionConfig};
use crate::metrics::{DeleteReason, Metrics, RouteMetrics, StoreOp, UpstreamErrorKind};
use crate::session::headers::Added;
use crate::session::key::IdKey;
use crate::session::{cookie, headers as sh, Clock, Patch, Policy, Record, SessionKey};
use crate::store::{signed, AnyStore, Applied, Store, StoreError, WriteCtx};
use crate::timer::Wheel;
pub use error::ProxyError;
use route::{Route, Router};
pub use upstream::ClientBody;
use upstream::{Pool, PooledBody, SendError, UpstreamBody};

pub type RespBody = Either<PooledBody, Full<Bytes>>;

/// Room for the fields the proxy adds to a request, beyond the session data.
const ADDED_CAPACITY: usize = 384;

/// What could be read of a request head the connection layer refused,
/// for its access log line: `None` for what the head did not show.
#[derive(Debug, Default)]
pub struct RefusedHead {
    pub method: Option<Method>,
    pub target: Option<http::uri::PathAndQuery>,
    /// HTTP/1.1 when the head did not say.
    pub version: Version,
    pub referer: Option<HeaderValue>,
    pub user_agent: Option<HeaderValue>,
}

/// What the server knows about the connection a request came on.
///
/// The server clones it for each request, and a clone starts with empty
/// notes: the request path writes into them (route, upstream, session id)
/// for the metrics and the access log, with no allocation.
#[derive(Debug)]
pub struct ConnInfo {
    /// The peer: the TCP peer, or the address a PROXY protocol header gave.
    pub peer: SocketAddr,
    pub tls: bool,
    /// The peer is one of `trusted_proxies` (SPEC 7.4).
    pub trusted: bool,
    /// The peer's address as sent in `X-Forwarded-For`, formatted once per
    /// connection.
    forwarded_for: HeaderValue,
    note: Note,
}

/// What one request's path found out, for the metrics and the access log.
#[derive(Debug, Default)]
struct Note {
    /// The route's index + 1 (0: none matched).
    route: AtomicUsize,
    /// The upstream's index + 1 (0: none answered).
    upstream: AtomicUsize,
    /// Nanoseconds the upstream took to its response head.
    upstream_ns: AtomicU64,
    /// The `X-Session-Id` sent upstream (JSON access log only).
    session_id: OnceLock<[u8; 32]>,
}

impl Clone for ConnInfo {
    fn clone(&self) -> ConnInfo {
        ConnInfo {
            peer: self.peer,
            tls: self.tls,
            trusted: self.trusted,
            forwarded_for: self.forwarded_for.clone(),
            note: Note::default(),
        }
    }
}

impl ConnInfo {
    pub fn new(peer: SocketAddr, tls: bool) -> ConnInfo {
        ConnInfo::with_trust(peer, tls, false)
    }

    /// `trusted`: the peer is a trusted proxy, whose `X-Forwarded-*` are kept.
    pub fn with_trust(peer: SocketAddr, tls: bool, trusted: bool) -> ConnInfo {
        let ip = peer.ip().to_canonical().to_string();
        ConnInfo {
            peer,
            tls,
            trusted,
            forwarded_for: HeaderValue::from_str(&ip).expect("an IP address is a header value"),
            note: Note::default(),
        }
    }
}

/// The client's address behind trusted proxies (nginx's
/// `real_ip_recursive on`): the rightmost `X-Forwarded-For` address that is
/// not itself trusted; the leftmost when all are; the peer when the header
/// is absent or unreadable.
pub fn real_client(h: &HeaderMap, peer: IpAddr, trusted: &[ipnet::IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(&ip.to_canonical()));
    let mut client = peer;
    let mut values: Vec<&[u8]> = h
        .get_all(&headers::X_FORWARDED_FOR)
        .iter()
        .map(|v| v.as_bytes())
        .collect();
    values.reverse();
    for v in values {
        let Ok(v) = std::str::from_utf8(v) else {
            return client;
        };
        for part in v.rsplit(',') {
            let part = part.trim();
            let ip = part
                .parse::<IpAddr>()
                .or_else(|_| part.parse::<SocketAddr>().map(|s| s.ip()))
                .or_else(|_| {
                    part.trim_start_matches('[')
                        .trim_end_matches(']')
                        .parse::<IpAddr>()
                });
            let Ok(ip) = ip else { return client };
            client = ip;
            if !is_trusted(&ip) {
                return ip;
            }
        }
    }
    client
}

/// What the proxy keeps per route for metrics and the access log.
struct RouteOps {
    metrics: RouteMetrics,
    name: Arc<str>,
    upstreams: Vec<Arc<str>>,
}

pub struct Proxy {
    router: Router,
    pool: Arc<Pool>,
    store: Arc<AnyStore>,
    /// `signed_cookies`: the codec of this generation's configuration
    /// (see [`crate::store::signed::SignedCookies::snapshot`]).
    signed: Option<crate::store::signed::SignedCookies>,
    session: SessionConfig,
    /// `secret_key` prepared for `X-Session-Id`.
    ids: IdKey,
    policy: Policy,
    clock: Clock,
    max_body: u64,
    client_body_timeout: Duration,
    /// `max_session_size`: the longest session JSON a change may make.
    max_session: u64,
    /// `refresh_interval` in ms (0: off): sliding expiry (SPEC 10).
    refresh_ms: i64,
    /// This worker's coarse timers (upstream timeout, header-read timeout).
    timer: Wheel,
    hsts: Option<HeaderValue>,
    metrics: Arc<Metrics>,
    /// Whether requests are counted: only with an `[admin]` section, the only
    /// reader of the metrics (the connection gauges count regardless).
    metrics_on: bool,
    /// Per route (by index), then the requests no route matched.
    route_ops: Vec<RouteOps>,
    no_route: RouteMetrics,
    access_log: AccessLog,
    json_log: bool,
    trusted_proxies: Arc<[ipnet::IpNet]>,
}

/// A one-line plain-text error response.
pub fn error_response(status: StatusCode, msg: &str) -> Response<RespBody> {
    let mut body = String::with_capacity(msg.len() + 1);
    body.push_str(msg);
    body.push('\n');
    let mut r = Response::new(Either::Right(Full::new(Bytes::from(body))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// The session of one request as loaded.
struct Loaded {
    /// A session cookie was presented (valid or not).
    presented: bool,
    /// The key and record when the cookie named a live session.
    live: Option<(SessionKey, Record)>,
    /// signed_cookies: numbered chunk cookies the request carried.
    chunks: Vec<usize>,
}

/// The methods the proxy itself answers `OPTIONS` and `405` with.
static ALLOW: HeaderValue =
    HeaderValue::from_static("GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS");

impl Proxy {
    /// A proxy with metrics of its own, counted whether or not `config` has
    /// an `[admin]` section, and no access log (tests, benches).
    pub fn new(config: &Config, store: Arc<AnyStore>, clock: Clock) -> Proxy {
        let mut p = Proxy::with_ops(
            config,
            store,
            clock,
            Arc::new(Metrics::new()),
            AccessLog::off(),
        );
        p.metrics_on = true;
        p
    }

    /// A proxy that counts into `metrics` and logs into `access_log`.
    pub fn with_ops(
        config: &Config,
        store: Arc<AnyStore>,
        clock: Clock,
        metrics: Arc<Metrics>,
        access_log: AccessLog,
    ) -> Proxy {
        let s = &config.server;
        let mut router = Router::new(config.routes.clone());
        let timer = Wheel::new();
        let mut pool = Pool::new(
            s.upstream_connect_timeout,
            s.upstream_timeout,
            timer.clone(),
        );
        pool.limit_connections(s.max_upstream_connections);
        for (i, route) in router.routes.iter_mut().enumerate() {
            route.index = i;
            route.slots = route
                .cfg
                .upstreams
                .iter()
                .map(|u| pool.slot_for(u))
                .collect();
        }
        let route_ops = router
            .routes
            .iter()
            .map(|r| RouteOps {
                metrics: metrics.route(&r.cfg.name),
                name: r.cfg.name.as_str().into(),
                upstreams: r
                    .cfg
                    .upstreams
                    .iter()
                    .map(|u| u.base.as_str().into())
                    .collect(),
            })
            .collect();
        Proxy {
            signed: store.as_signed().map(|s| s.snapshot()),
            no_route: metrics.route(crate::metrics::NO_ROUTE),
            route_ops,
            metrics,
            metrics_on: config.admin.is_some(),
            json_log: access_log.is_on() && s.access_log_format == AccessLogFormat::Json,
            access_log,
            trusted_proxies: s.trusted_proxies.clone().into(),
            router,
            pool: Arc::new(pool),
            store,
            session: config.session.clone(),
            ids: IdKey::new(&config.session.secret_key),
            policy: Policy::from_config(&config.session),
            clock,
            max_body: s.max_request_body,
            client_body_timeout: s.client_body_timeout,
            max_session: config.session.max_session_size,
            refresh_ms: config.session.refresh_interval.as_millis() as i64,
            timer,
            hsts: (!s.hsts.is_zero()).then(|| {
                HeaderValue::from_str(&format!("max-age={}", s.hsts.as_secs())).expect("ascii")
            }),
        }
    }

    pub fn store(&self) -> &Arc<AnyStore> {
        &self.store
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// A store call, timed into `sessiongate_store_duration_seconds{op}`;
    /// a failure counts in `sessiongate_store_errors_total`.
    async fn timed<T>(
        &self,
        op: StoreOp,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        if !self.metrics_on {
            return call.await;
        }
        let start = Instant::now();
        let r = call.await;
        self.metrics.store_op(op).observe(start.elapsed());
        if r.is_err() {
            self.metrics.store_errors.inc();
        }
        r
    }

    /// Counts into the metrics when they are kept (`metrics_on`).
    fn count<T>(&self, f: impl FnOnce(&Metrics) -> T) {
        if self.metrics_on {
            f(&self.metrics);
        }
    }

    /// The timers of this proxy's worker, for the server's header-read
    /// timeout.
    pub fn timer(&self) -> &Wheel {
        &self.timer
    }

    /// Serves one request. Never fails: every error is a response.
    #[allow(clippy::manual_async_fn)] // on purpose: see the async block
    pub fn handle(
        self: Arc<Self>,
        req: Request<ClientBody>,
        conn: ConnInfo,
    ) -> impl Future<Output = Result<Response<RespBody>, Infallible>> {
        // A block, not an `async fn`: the arguments are captured once
        // instead of being copied into locals beside themselves, which
        // keeps the request's future (moved whole at each step) smaller.
        async move {
            let start = Instant::now();
            // The access log's fields, taken before the request is consumed:
            // shared values (no copy), never a cookie, a key or session data.
            let access = self.access_log.is_on().then(|| {
                let h = req.headers();
                let client = if conn.trusted {
                    real_client(h, conn.peer.ip(), &self.trusted_proxies)
                } else {
                    conn.peer.ip()
                };
                (
                    SystemTime::now(),
                    client,
                    Some(req.method().clone()),
                    req.uri().path_and_query().cloned(),
                    req.version(),
                    headers::has(h, &header::REFERER)
                        .then(|| h.get(header::REFERER).cloned())
                        .flatten(),
                    h.get(header::USER_AGENT).cloned(),
                )
            });
            let mut resp = self.serve(req, &conn).await;
            let took = start.elapsed();
            let status = resp.status().as_u16();
            let ops = conn
                .note
                .route
                .load(Ordering::Relaxed)
                .checked_sub(1)
                .and_then(|i| self.route_ops.get(i));
            if self.metrics_on {
                match ops {
                    Some(o) => o.metrics.request(status, took),
                    None => self.no_route.request(status, took),
                }
            }
            if let Some((time, client, method, target, version, referer, user_agent)) = access {
                use http_body::Body as _;
                let upstream = conn.note.upstream.load(Ordering::Relaxed).checked_sub(1);
                self.access_log.log(&Entry {
                    time,
                    client,
                    method,
                    target,
                    version,
                    status,
                    bytes: resp.body().size_hint().exact(),
                    referer,
                    user_agent,
                    duration: took,
                    route: ops.map(|o| &*o.name),
                    upstream: ops
                        .zip(upstream)
                        .and_then(|(o, i)| o.upstreams.get(i))
                        .map(|u| &**u),
                    upstream_time: upstream.map(|_| {
                        Duration::from_nanos(conn.note.upstream_ns.load(Ordering::Relaxed))
                    }),
                    session_id: conn.note.session_id.get().copied(),
                });
            }
            if conn.tls {
                if let Some(h) = &self.hsts {
                    resp.headers_mut()
                        .insert(header::STRICT_TRANSPORT_SECURITY, h.clone());
                }
            }
            Ok(resp)
        }
    }

    /// The `Strict-Transport-Security` value for a response on `conn`
    /// (TLS, with `hsts` set).
    pub fn hsts(&self, conn: &ConnInfo) -> Option<&HeaderValue> {
        self.hsts.as_ref().filter(|_| conn.tls)
    }

    /// Counts and logs a request the connection layer answered itself
    /// (a head hyper would refuse: `400`, `431`, `501`; plain HTTP on the
    /// TLS port), as every other request is: route `-`, nothing sent
    /// upstream. `head` is what could be read of the request's head.
    pub fn refused(&self, conn: &ConnInfo, status: StatusCode, body_len: usize, head: RefusedHead) {
        if self.metrics_on {
            self.no_route.request(status.as_u16(), Duration::ZERO);
        }
        if self.access_log.is_on() {
            self.access_log.log(&Entry {
                time: SystemTime::now(),
                client: conn.peer.ip(),
                method: head.method,
                target: head.target,
                version: head.version,
                status: status.as_u16(),
                bytes: Some(body_len as u64),
                referer: head.referer,
                user_agent: head.user_agent,
                duration: Duration::ZERO,
                route: None,
                upstream: None,
                upstream_time: None,
                session_id: None,
            });
        }
    }

    #[allow(clippy::manual_async_fn)] // on purpose: see the async block
    fn serve<'a>(
        &'a self,
        req: Request<ClientBody>,
        conn: &'a ConnInfo,
    ) -> impl Future<Output = Response<RespBody>> + 'a {
        // A block, not an `async fn`: the arguments are captured once
        // instead of being copied into locals beside themselves, which
        // keeps the request's future (moved whole at each step) smaller.
        async move {
            let (mut parts, body) = req.into_parts();
            let (route, host) = match self.admit(&mut parts) {
                Ok(Admitted::Forward(route, host)) => (route, host),
                Ok(Admitted::OptionsHere) => return options_response(),
                Err(e) => return self.error_reply(None, e),
            };
            conn.note.route.store(route.index + 1, Ordering::Relaxed);
            if let Some(len) = content_length(&parts.headers) {
                if len > self.max_body {
                    let mut r =
                        self.error_reply(Some(route), ProxyError::BodyTooLarge(self.max_body));
                    if route.cfg.session {
                        headers::add_vary_cookie(r.headers_mut());
                    }
                    return r;
                }
            }

            // A real WebSocket upgrade: HTTP/1.1, `Connection: upgrade` and
            // `Upgrade: websocket`. Any other `Upgrade` goes with the
            // hop-by-hop fields below.
            let upgrade = headers::upgrade_request(parts.version, &parts.headers);
            let client_io = upgrade
                .as_ref()
                .and_then(|_| parts.extensions.remove::<hyper::upgrade::OnUpgrade>());

            // Hygiene before anything is added: hop-by-hop names (including the
            // ones the client nominated), then the reserved and forward names,
            // then the session cookie, on every route.
            headers::remove_hop_by_hop(&mut parts.headers);
            headers::take_reserved(&mut parts.headers);
            // The `forward` names of every route, on every route (SPEC 3.1):
            // one upstream often serves several routes.
            for name in &self.router.forward_names {
                parts.headers.remove(name);
            }
            headers::remove_underscore_aliases(&mut parts.headers, &self.router.forward_names);
            if let Some(proto) = &upgrade {
                parts
                    .headers
                    .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                parts.headers.insert(header::UPGRADE, proto.clone());
            }

            let mut resp = if route.cfg.session {
                let mut resp = self.serve_session(route, parts, body, conn, host).await;
                headers::add_vary_cookie(resp.headers_mut());
                resp
            } else {
                if !route.cfg.cookie_passthrough {
                    self.strip_session_cookies(&mut parts.headers);
                }
                match self
                    .forward(
                        route,
                        parts,
                        body,
                        conn,
                        host,
                        Added::with_capacity(ADDED_CAPACITY),
                    )
                    .await
                {
                    Ok(mut resp) => {
                        headers::take_reserved(resp.headers_mut());
                        if !route.cfg.cookie_passthrough {
                            drop_session_set_cookies(resp.headers_mut(), &self.session.cookie_name);
                        }
                        resp.map(Either::Left)
                    }
                    Err(e) => self.error_reply(Some(route), e),
                }
            };
            *resp.version_mut() = Version::HTTP_11;
            if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                match (
                    client_io,
                    resp.extensions_mut().remove::<hyper::upgrade::OnUpgrade>(),
                ) {
                    (Some(client), Some(upstream)) => {
                        tokio::spawn(tunnel(client, upstream));
                    }
                    _ => return self.error_reply(Some(route), ProxyError::UpstreamSwitched),
                }
            }
            resp
        }
    }

    /// The checks before anything is loaded or forwarded: method,
    /// framing, authority, path, route. Kept out of the request's future
    /// (a plain function) so that its locals do not enlarge it.
    fn admit(&self, parts: &mut http::request::Parts) -> Result<Admitted<'_>, ProxyError> {
        match parts.method {
            Method::CONNECT => return Err(ProxyError::MethodNotAllowed("CONNECT")),
            // It would echo the session headers back (SPEC 3.1).
            Method::TRACE => return Err(ProxyError::MethodNotAllowed("TRACE")),
            _ => {}
        }
        headers::check_transfer_coding(&parts.headers).map_err(ProxyError::TransferCoding)?;
        let mut hosts = parts.headers.get_all(header::HOST).iter();
        let first_host = hosts.next();
        if hosts.next().is_some() {
            return Err(ProxyError::MultipleHosts);
        }
        // The authority of the request target (HTTP/2 :authority, or an
        // absolute-form target) wins over Host (RFC 9112 3.2.2).
        let host: Option<HeaderValue> = match parts.uri.authority() {
            Some(a) => {
                headers::check_host(a.as_str().as_bytes()).map_err(ProxyError::InvalidHost)?;
                Some(HeaderValue::from_str(a.as_str()).map_err(|_| ProxyError::InvalidTarget)?)
            }
            None => match first_host {
                Some(h) => {
                    headers::check_host(h.as_bytes()).map_err(ProxyError::InvalidHost)?;
                    Some(h.clone())
                }
                None => None,
            },
        };
        // HTTP/1.0 may go without; an HTTP/2 request with neither
        // `:authority` nor `Host` is malformed (RFC 9113 8.3.1).
        if host.is_none() && matches!(parts.version, Version::HTTP_11 | Version::HTTP_2) {
            return Err(ProxyError::MissingHost);
        }
        if parts.method == Method::OPTIONS && max_forwards(&mut parts.headers) {
            return Ok(Admitted::OptionsHere);
        }
        let normalized = match path::normalize(parts.uri.path()) {
            Ok(std::borrow::Cow::Borrowed(_)) => None,
            Ok(std::borrow::Cow::Owned(p)) => Some(p),
            Err(e) => return Err(ProxyError::InvalidPath(e)),
        };
        // An absolute-form target with an empty path (`http://a?x=1`) has
        // the path "/" (RFC 9112 3.2.2); `Uri::path()` says so, but its
        // path-and-query, which is what goes upstream, starts at the `?`.
        let empty_path = parts
            .uri
            .path_and_query()
            .is_some_and(|pq| pq.as_str().starts_with('?'));
        let normalized = match normalized {
            None if empty_path => Some(parts.uri.path().to_string()),
            n => n,
        };
        if let Some(p) = normalized {
            let pq = match parts.uri.query() {
                Some(q) => format!("{p}?{q}"),
                None => p,
            };
            let mut up = std::mem::take(&mut parts.uri).into_parts();
            up.path_and_query = pq.parse().ok();
            parts.uri = Uri::from_parts(up).map_err(|_| ProxyError::InvalidTarget)?;
        }
        let route_path = path::for_routing(parts.uri.path()).map_err(ProxyError::InvalidPath)?;
        let route = self
            .router
            .find(host.as_ref().and_then(|h| h.to_str().ok()), &route_path)
            .ok_or(ProxyError::NoRoute)?;
        Ok(Admitted::Forward(route, host))
    }

    /// The response for a failure of the proxy's (SPEC 6), logged: the
    /// client's faults at debug, the rest at warn.
    fn error_reply(&self, route: Option<&Route>, e: ProxyError) -> Response<RespBody> {
        let kind = match &e {
            ProxyError::UpstreamConnect(_) | ProxyError::UpstreamCertificate(_) => {
                Some(UpstreamErrorKind::Connect)
            }
            ProxyError::UpstreamTimeout(_) => Some(UpstreamErrorKind::Timeout),
            ProxyError::UpstreamIo(_)
            | ProxyError::UpstreamProtocol(_)
            | ProxyError::UpstreamClosed(_)
            | ProxyError::UpstreamSwitched
            | ProxyError::UpstreamUpgrade(_) => Some(UpstreamErrorKind::Protocol),
            _ => None,
        };
        if let (true, Some(k), Some(o)) = (
            self.metrics_on,
            kind,
            route.and_then(|r| self.route_ops.get(r.index)),
        ) {
            o.metrics.upstream_error(k);
        }
        let (status, body) = e.status_and_body();
        let route = route.map_or("", |r| r.cfg.name.as_str());
        if status.is_client_error() {
            tracing::debug!(route, status = status.as_u16(), error = %error::one_line(&e), "request refused");
        } else {
            tracing::warn!(route, status = status.as_u16(), error = %error::one_line(&e), "request failed");
        }
        let mut r = error_response(status, &body);
        if status == StatusCode::METHOD_NOT_ALLOWED {
            r.headers_mut().insert(header::ALLOW, ALLOW.clone());
        }
        r
    }

    #[allow(clippy::manual_async_fn)] // on purpose: see the async block
    fn serve_session<'a>(
        &'a self,
        route: &'a Route,
        mut parts: http::request::Parts,
        body: ClientBody,
        conn: &'a ConnInfo,
        host: Option<HeaderValue>,
    ) -> impl Future<Output = Response<RespBody>> + 'a {
        // A block, not an `async fn`: the arguments are captured once
        // instead of being copied into locals beside themselves, which
        // keeps the request's future (moved whole at each step) smaller.
        async move {
            let now = self.clock.now_ms();
            let loaded = match self.load(&parts.headers, now).await {
                Ok(l) => l,
                Err(e) => return self.error_reply(Some(route), ProxyError::Store(e)),
            };
            self.strip_session_cookies(&mut parts.headers);

            let needs_map = !route.cfg.login_required.is_empty() || !route.cfg.forward.is_empty();
            let map: Option<Map<String, Value>> = needs_map.then(|| {
                loaded
                    .live
                    .as_ref()
                    .map(|(_, r)| r.data_map())
                    .unwrap_or_default()
            });
            if let Some(m) = &map {
                if let Some(missing) = route
                    .cfg
                    .login_required
                    .iter()
                    .find(|k| !m.contains_key(*k))
                {
                    tracing::debug!(route = %route.cfg.name, key = %missing, "login required");
                    let mut resp = self.login_redirect(route, &parts.method, &parts.uri);
                    return match self
                        .finish(&loaded, Patch::default(), resp.status(), resp.headers_mut())
                        .await
                    {
                        Ok(()) => resp,
                        Err(e) => self.error_reply(Some(route), e),
                    };
                }
            }

            let (key, record) = match &loaded.live {
                Some((k, r)) => (Some(k), Some(r)),
                None => (None, None),
            };
            if self.json_log {
                if let Some(k) = key {
                    let _ = conn.note.session_id.set(k.public_id_hex(&self.ids));
                }
            }
            let view = sh::View {
                // Django's signed-cookie format carries no key.
                key: key.filter(|_| !self.signed.as_ref().is_some_and(|c| c.is_django())),
                record,
                is_new: loaded.live.is_none(),
            };
            let data_len = view.record.map_or(0, |r| r.data.len());
            let mut added = Added::with_capacity(ADDED_CAPACITY + data_len);
            sh::inject(
                &mut added,
                &view,
                now,
                &self.policy,
                &self.ids,
                &route.cfg.forward,
                map.as_ref(),
            );

            let resp = match self.forward(route, parts, body, conn, host, added).await {
                Ok(r) => r,
                Err(e) => return self.error_reply(Some(route), e),
            };
            let (mut rparts, rbody) = resp.into_parts();
            let directives = headers::take_reserved(&mut rparts.headers);
            drop_session_set_cookies(&mut rparts.headers, &self.session.cookie_name);

            let patch = if rparts.status.is_server_error() {
                Patch::default()
            } else {
                match Patch::parse(directives.iter().map(|(n, v)| (n, v))) {
                    Ok(p) => p,
                    Err(e) => {
                        return self.error_reply(Some(route), ProxyError::Directive(Box::new(e)))
                    }
                }
            };
            if patch.ends_sessions() && self.session.user_key.is_none() {
                let header = if patch.logout_others {
                    crate::session::directives::LOGOUT_OTHERS
                } else {
                    crate::session::directives::LOGOUT_USER
                };
                let e = crate::session::DirectiveError {
                    header,
                    problem: "needs [session] user_key in sessiongate's config".into(),
                };
                return self.error_reply(Some(route), ProxyError::Directive(Box::new(e)));
            }
            if let Err(e) = self.check_size(&loaded, &patch, &directives) {
                return self.error_reply(Some(route), e);
            }
            match self
                .finish(&loaded, patch, rparts.status, &mut rparts.headers)
                .await
            {
                Ok(()) => Response::from_parts(rparts, Either::Left(rbody)),
                Err(e) => self.error_reply(Some(route), e),
            }
        }
    }

    /// Finds the session cookie and loads its record. A cookie that is
    /// malformed, unknown or expired is never adopted.
    async fn load(&self, h: &HeaderMap, now: i64) -> Result<Loaded, StoreError> {
        let name = &self.session.cookie_name;
        if let Some(codec) = self.signed.as_ref() {
            let chunks = codec.chunks(h);
            let token = codec.token(h);
            let live = token
                .as_ref()
                .and_then(|t| t.as_deref())
                .and_then(|t| codec.decode(t.as_bytes(), now))
                .filter(|(_, r)| self.within_absolute(r, now));
            return Ok(Loaded {
                presented: token.is_some() || !chunks.is_empty(),
                live,
                chunks,
            });
        }
        let Some(value) = cookie::find(h, name) else {
            return Ok(Loaded {
                presented: false,
                live: None,
                chunks: Vec::new(),
            });
        };
        let live = match SessionKey::parse_bytes(value) {
            Some(k) => self
                .timed(StoreOp::Load, self.store.load(&k, now))
                .await?
                .filter(|r| self.within_absolute(r, now))
                .map(|r| (k, r)),
            None => None,
        };
        Ok(Loaded {
            presented: true,
            live,
            chunks: Vec::new(),
        })
    }

    /// `max_session_size`: a patch that would make the session's JSON
    /// larger than the limit (and larger than it was) is refused before
    /// anything is written. Checked here against the session as this
    /// request loaded it (the full apply runs only when the directives could
    /// reach the limit at all: the read path and small writes pay nothing),
    /// and again by every engine on the newest state it applies the patch
    /// to (`WriteCtx::max_size`, `Applied::TooLarge`), so two concurrent
    /// writes that each pass here cannot together store more.
    fn check_size(
        &self,
        loaded: &Loaded,
        patch: &Patch,
        directives: &[(http::HeaderName, HeaderValue)],
    ) -> Result<(), ProxyError> {
        if self.max_session == 0 || !(patch.replace.is_some() || patch.has_update) {
            return Ok(());
        }
        // After a Flush the rest applies to a fresh session.
        let live = loaded.live.as_ref().filter(|_| !patch.flush);
        let before = live.map_or(2, |(_, r)| r.data.len());
        // Each byte of a directive becomes at most six in the stored JSON
        // (`\uXXXX`), plus a separator.
        let bound = directives
            .iter()
            .fold(before as u64, |n, (_, v)| n + 6 * v.len() as u64 + 1);
        if bound <= self.max_session {
            return Ok(());
        }
        let now = self.clock.now_ms();
        let mut record = match live {
            Some((_, r)) => r.clone(),
            None => Record::new_at(now),
        };
        record.apply_patch(patch, now, &self.policy);
        let size = record.data.len();
        if size as u64 > self.max_session && size > before {
            return Err(ProxyError::SessionTooLarge {
                size,
                limit: self.max_session,
            });
        }
        Ok(())
    }

    /// Whether Django would have saved this session: the patch changes the
    /// state the request loaded, cycles the key, or every request saves.
    fn would_save(&self, loaded: &Loaded, patch: &Patch, now: i64) -> bool {
        if patch.cycle || self.session.save_every_request {
            return true;
        }
        match &loaded.live {
            Some((_, record)) => record.clone().apply_patch(patch, now, &self.policy),
            None => true,
        }
    }

    /// Removes the session cookie (and signed-cookie chunks) from what goes
    /// upstream.
    fn strip_session_cookies(&self, h: &mut HeaderMap) {
        let name = &self.session.cookie_name;
        cookie::strip(h, name);
        if self.signed.as_ref().is_some() {
            for i in signed::presented_chunks(h, name) {
                cookie::strip(h, &signed::chunk_name(name, i));
            }
        }
    }

    /// absolute_timeout also holds for records written before it was
    /// configured (their stored end of life does not include it).
    fn within_absolute(&self, r: &Record, now: i64) -> bool {
        self.policy.absolute_timeout_ms == 0 || r.created + self.policy.absolute_timeout_ms > now
    }

    /// Applies the upstream's patch and sets or deletes the cookie, following
    /// Django's SessionMiddleware.process_response.
    async fn finish(
        &self,
        loaded: &Loaded,
        mut patch: Patch,
        status: StatusCode,
        out: &mut HeaderMap,
    ) -> Result<(), ProxyError> {
        if status.is_server_error() {
            return Ok(());
        }
        let save_every = self.session.save_every_request;
        let mut current = loaded.live.as_ref().map(|(k, _)| *k);
        let codec = self.signed.as_ref();
        if patch.flush {
            if let Some(k) = current.take() {
                if codec.is_none() {
                    self.timed(StoreOp::Delete, self.store.delete(&k))
                        .await
                        .map_err(ProxyError::Store)?;
                }
                self.count(|m| m.session_deleted(DeleteReason::Flush));
            }
            patch.flush = false;
        }
        let refresh = self.wants_refresh(loaded);
        if current.is_some() && patch.is_empty() && !save_every && !refresh {
            // The read path: nothing to write, not even a clock to read
            // (unless a refresh interval is set).
            return Ok(());
        }
        let now = self.clock.now_ms();
        let ctx = WriteCtx {
            now,
            policy: self.policy,
            touch: save_every,
            refresh_ms: if refresh { self.refresh_ms } else { 0 },
            max_size: self.max_session,
        };
        // The session as it stands after the rest of the patch: what the
        // user directives act on.
        let mut after: Option<(SessionKey, Bytes)> = None;
        match current {
            Some(key) => {
                let applied = match (codec, &loaded.live) {
                    (Some(_), Some((_, record))) => {
                        crate::store::apply_local(&key, record, &patch, ctx)
                    }
                    // The record this request loaded: an engine that
                    // compares and sets need not read it again.
                    (None, Some((_, seen))) => self
                        .timed(
                            StoreOp::Apply,
                            self.store.apply_seen(&key, seen, &patch, ctx),
                        )
                        .await
                        .map_err(ProxyError::Store)?,
                    _ => self
                        .timed(StoreOp::Apply, self.store.apply(&key, &patch, ctx))
                        .await
                        .map_err(ProxyError::Store)?,
                };
                match applied {
                    Applied::Saved { key, record } => {
                        self.count(|m| m.sessions_saved.inc());
                        if patch.cycle {
                            self.count(|m| m.session_deleted(DeleteReason::Cycle));
                        }
                        self.set_cookie(out, loaded, &key, &record, now)?;
                        after = Some((key, record.data));
                    }
                    Applied::Unchanged => {
                        after = loaded.live.as_ref().map(|(k, r)| (*k, r.data.clone()));
                    }
                    // Django raises SessionInterrupted only when it had
                    // something to save: a response whose directives change
                    // nothing in the session as this request loaded it (a
                    // Delete of an absent key, say) is not interrupted.
                    // Logout-Others acts on the session's user: when the
                    // session is gone (another request flushed or cycled
                    // it) it cannot, and the upstream is told so.
                    Applied::Missing
                        if !self.would_save(loaded, &patch, now) && !patch.logout_others => {}
                    Applied::Missing => {
                        self.count(|m| m.sessions_interrupted.inc());
                        return Err(ProxyError::Interrupted);
                    }
                    // Over max_session_size on the newest state (a
                    // concurrent write grew it since this request loaded
                    // it): nothing was written.
                    Applied::TooLarge { size } => {
                        return Err(ProxyError::SessionTooLarge {
                            size,
                            limit: self.max_session,
                        });
                    }
                }
            }
            None => {
                let mut record = Record::new_at(now);
                record.apply_patch(&patch, now, &self.policy);
                // A session that would end at once (an Expiry in the past)
                // is not made: no record, no key, no cookie.
                let keep = (!record.data_is_empty()
                    || patch.cycle
                    || patch
                        .expiry
                        .is_some_and(|e| e != crate::session::Expiry::Default))
                    && record.is_live(now);
                if keep {
                    let key = match codec {
                        Some(_) => SessionKey::generate(),
                        None => self
                            .timed(StoreOp::Create, self.store.create(record.clone()))
                            .await
                            .map_err(ProxyError::Store)?,
                    };
                    self.count(|m| m.sessions_created.inc());
                    self.set_cookie(out, loaded, &key, &record, now)?;
                    after = Some((key, record.data));
                } else if loaded.presented {
                    out.append(header::SET_COOKIE, cookie::delete(&self.session));
                    for &i in &loaded.chunks {
                        let name = signed::chunk_name(&self.session.cookie_name, i);
                        out.append(
                            header::SET_COOKIE,
                            cookie::delete_named(&self.session, &name),
                        );
                    }
                    headers::add_private(out);
                }
            }
        }
        if patch.ends_sessions() {
            self.end_sessions(&patch, after, loaded, out).await?;
        }
        Ok(())
    }

    /// `refresh_interval` (SPEC 10): a persistent session last written
    /// longer ago than the interval is written again (its expiry slides:
    /// `cookie_age`, or its own seconds, from now). Not a browser-close
    /// session, and not one with a fixed end (`X-Session-Expiry` with a
    /// date), whose expiry a write would not move.
    fn wants_refresh(&self, loaded: &Loaded) -> bool {
        if self.refresh_ms == 0 {
            return false;
        }
        match &loaded.live {
            Some((_, r))
                if !r.expire_at_browser_close(&self.policy)
                    && !matches!(r.expiry, crate::session::Expiry::At(_)) =>
            {
                self.clock.now_ms() - r.modified >= self.refresh_ms
            }
            _ => false,
        }
    }

    /// Logout-Others and Logout-User (SPEC 9), against the user the session
    /// names after the rest of the patch. When the current session is among
    /// the ended ones, it is flushed: its cookie is deleted, not set.
    async fn end_sessions(
        &self,
        patch: &Patch,
        after: Option<(SessionKey, Bytes)>,
        loaded: &Loaded,
        out: &mut HeaderMap,
    ) -> Result<(), ProxyError> {
        let Some(user_key) = self.session.user_key.as_deref() else {
            return Ok(());
        };
        let now = self.clock.now_ms();
        let (key, user) = match &after {
            Some((k, data)) => (Some(k), crate::store::user_of(data, user_key)),
            None => (None, None),
        };
        let mut ended = 0;
        if patch.logout_others {
            if let (Some(k), Some(u)) = (key, user.as_deref()) {
                ended += self
                    .timed(StoreOp::Revoke, self.store.revoke_user(u, Some(k), now))
                    .await
                    .map_err(ProxyError::Store)?;
            }
        }
        let mut current_ended = false;
        // The empty string names no user (`store::user_of`): it ends nothing.
        for v in patch.logout_users.iter().filter(|v| !v.is_empty()) {
            ended += self
                .timed(StoreOp::Revoke, self.store.revoke_user(v, None, now))
                .await
                .map_err(ProxyError::Store)?;
            current_ended |= user.as_deref() == Some(v.as_str());
        }
        self.count(|m| m.sessions_deleted(DeleteReason::Revoked, ended));
        if current_ended {
            drop_session_set_cookies(out, &self.session.cookie_name);
            if loaded.presented {
                out.append(header::SET_COOKIE, cookie::delete(&self.session));
                headers::add_private(out);
            }
        }
        Ok(())
    }

    fn set_cookie(
        &self,
        out: &mut HeaderMap,
        loaded: &Loaded,
        key: &SessionKey,
        record: &Record,
        now: i64,
    ) -> Result<(), ProxyError> {
        let max_age = (!record.expire_at_browser_close(&self.policy))
            .then(|| record.expiry_age(now, &self.policy));
        let name = &self.session.cookie_name;
        match self.signed.as_ref() {
            None => {
                out.append(
                    header::SET_COOKIE,
                    cookie::set(&self.session, key.as_str(), max_age, now),
                );
            }
            Some(codec) => {
                let token = codec.encode(key, record);
                let parts = codec
                    .cookie_values(&token)
                    .map_err(ProxyError::SignedTooLarge)?;
                for (i, value) in parts.iter().enumerate() {
                    let n = signed::chunk_name(name, i);
                    out.append(
                        header::SET_COOKIE,
                        cookie::set_named(&self.session, &n, value, max_age, now),
                    );
                }
                // A shrunk session leaves no stale chunk behind.
                for &i in loaded.chunks.iter().filter(|&&i| i >= parts.len()) {
                    let n = signed::chunk_name(name, i);
                    out.append(header::SET_COOKIE, cookie::delete_named(&self.session, &n));
                }
            }
        }
        headers::add_private(out);
        Ok(())
    }

    fn login_redirect(&self, route: &Route, method: &Method, uri: &Uri) -> Response<RespBody> {
        if method != Method::GET && method != Method::HEAD {
            let mut r = error_response(StatusCode::UNAUTHORIZED, "login required");
            // RFC 9110 requires a challenge with a 401; the "Cookie" scheme
            // (draft-broyer-http-cookie-auth) names the login form and cookie.
            let challenge = format!(
                "Cookie realm=\"{}\", form-action=\"{}\", cookie-name=\"{}\"",
                route.cfg.name.replace(['"', '\\'], ""),
                route.cfg.login_url,
                self.session.cookie_name
            );
            if let Ok(v) = HeaderValue::from_str(&challenge) {
                r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
            }
            return r;
        }
        let next = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let enc = percent_encoding::utf8_percent_encode(next, NEXT_SET);
        let sep = if route.cfg.login_url.contains('?') {
            '&'
        } else {
            '?'
        };
        let location = format!("{}{}next={}", route.cfg.login_url, sep, enc);
        let mut r = error_response(StatusCode::FOUND, "login required");
        if let Ok(v) = HeaderValue::from_str(&location) {
            r.headers_mut().insert(header::LOCATION, v);
        }
        r
    }

    /// Sends the request to one of the route's upstreams, with the fields
    /// the proxy adds (the session's, then `X-Forwarded-*`).
    #[allow(clippy::manual_async_fn)] // on purpose: see the async block
    fn forward<'a>(
        &'a self,
        route: &'a Route,
        mut parts: http::request::Parts,
        body: ClientBody,
        conn: &'a ConnInfo,
        host: Option<HeaderValue>,
        mut added: Added,
    ) -> impl Future<Output = Result<Response<PooledBody>, ProxyError>> + 'a {
        // A block, not an `async fn`: the arguments are captured once
        // instead of being copied into locals beside themselves, which
        // keeps the request's future (moved whole at each step) smaller.
        async move {
            let h = &mut parts.headers;
            // The client's own X-Forwarded-*, Forwarded and X-Real-IP are
            // dropped: the proxy's replace them (a trusted proxy's are kept:
            // SPEC 7.4). So is `Expect`, as
            // nginx does: the client already had its `100 Continue` from this
            // proxy, which sends the body without waiting, and an old
            // upstream may refuse the field with a 417.
            if conn.trusted {
                headers::remove_each(h, &[&header::EXPECT]);
                forwarded_by_trusted(h, &mut added, conn, host.as_ref());
            } else {
                headers::remove_each(h, &[&header::EXPECT]);
                headers::remove_forwarding(h);
                added.push_value(&headers::X_FORWARDED_FOR, &conn.forwarded_for);
                added.push_value(&headers::X_FORWARDED_PROTO, scheme_value(conn.tls));
                if let Some(v) = &host {
                    added.push_value(&headers::X_FORWARDED_HOST, v);
                }
            }
            join_cookies(h);
            parts.version = Version::HTTP_11;
            // The request target without the upstream's own prefix: shared
            // (no copy) when nothing is stripped.
            let target: Option<http::uri::PathAndQuery> = if route.cfg.strip_prefix {
                // The prefix is stripped from the path as it came, its
                // escapes kept; when the prefix ends at an encoded slash
                // (`/app%2Fx`), from the path the route was chosen on.
                let raw = parts.uri.path();
                let routed;
                let from = if route::prefix_matches(&route.cfg.path, raw) {
                    raw
                } else {
                    routed = path::for_routing(raw).unwrap_or(std::borrow::Cow::Borrowed("/"));
                    &routed
                };
                let path = route::strip_prefix(&route.cfg.path, from);
                let pq = match parts.uri.query() {
                    Some(q) => format!("{path}?{q}"),
                    None => path.to_string(),
                };
                pq.parse().ok()
            } else {
                parts.uri.path_and_query().cloned()
            };
            let target = target.unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));

            let order = route.upstream_order(|| self.clock.now_ms());
            let mut body = Some(UpstreamBody::new(
                body,
                self.max_body,
                self.client_body_timeout,
                &self.timer,
            ));
            let mut last_err = None;
            for (n, &i) in order.iter().enumerate() {
                let up = &route.cfg.upstreams[i];
                let pq = if up.path.is_empty() {
                    target.clone()
                } else {
                    format!("{}{}", up.path, target.as_str())
                        .parse()
                        .map_err(ProxyError::UpstreamTarget)?
                };
                let Some(b) = body.take() else { break };
                // preserve_host with no Host from the client (HTTP/1.0, or h2
                // without :authority): the upstream's, as HTTP/1.1 requires one.
                let hv = match (&host, route.cfg.preserve_host) {
                    (Some(h), true) => h,
                    _ => &up.host_value,
                };
                // `upstream_timeout` is the pool's: it does not run while the
                // client's body keeps it waiting.
                let sent_at = Instant::now();
                let sent = self
                    .pool
                    .send(route.slots[i], &parts, &pq, b, hv, &added)
                    .await;
                let took = sent_at.elapsed();
                // The access log names the upstream last tried, answered or
                // not (nginx's `$upstream_addr`), and how long it took.
                conn.note.upstream.store(i + 1, Ordering::Relaxed);
                conn.note.upstream_ns.store(
                    u64::try_from(took.as_nanos()).unwrap_or(u64::MAX),
                    Ordering::Relaxed,
                );
                match sent {
                    Ok(mut resp) => {
                        if let (true, Some(o)) = (self.metrics_on, self.route_ops.get(route.index))
                        {
                            o.metrics.upstream_duration.observe(took);
                        }
                        route.mark_up(i);
                        let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
                        let proto = switching
                            .then(|| resp.headers().get(header::UPGRADE).cloned())
                            .flatten();
                        headers::remove_hop_by_hop(resp.headers_mut());
                        if switching {
                            // Only to a WebSocket upgrade, and only into one.
                            let websocket = proto
                                .as_ref()
                                .is_some_and(|p| p.as_bytes().eq_ignore_ascii_case(b"websocket"));
                            if !websocket {
                                return Err(ProxyError::UpstreamSwitched);
                            }
                            let h = resp.headers_mut();
                            h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                            h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
                        }
                        return Ok(resp);
                    }
                    Err(SendError {
                        error,
                        unsent: Some(b),
                    }) if !error.is_client_fault() => {
                        // Nothing of the request was acted on: the next
                        // upstream may have it.
                        let next = order.len() > n + 1;
                        if next {
                            tracing::warn!(route = %route.cfg.name, upstream = %up.base, error = %error::one_line(&error), "upstream failed before the request was sent; trying the next upstream");
                        }
                        if matches!(
                            error,
                            ProxyError::UpstreamConnect(_) | ProxyError::UpstreamCertificate(_)
                        ) {
                            route.mark_down(i, self.clock.now_ms());
                        }
                        last_err = Some(error);
                        body = Some(b);
                    }
                    Err(SendError { error, .. }) => return Err(error),
                }
            }
            Err(last_err.unwrap_or(ProxyError::UpstreamClosed("answering")))
        }
    }
}

fn scheme_value(tls: bool) -> &'static HeaderValue {
    static HTTPS: HeaderValue = HeaderValue::from_static("https");
    static HTTP: HeaderValue = HeaderValue::from_static("http");
    if tls {
        &HTTPS
    } else {
        &HTTP
    }
}

/// `X-Forwarded-*` for a request from a trusted proxy (SPEC 7.4): the
/// peer's address appended to the incoming `X-Forwarded-For` (as every
/// proxy in a chain does), the incoming `X-Forwarded-Proto` and
/// `X-Forwarded-Host` kept (the listener's scheme and the Host when absent).
fn forwarded_by_trusted(
    h: &mut HeaderMap,
    added: &mut Added,
    conn: &ConnInfo,
    host: Option<&HeaderValue>,
) {
    let incoming: Vec<&[u8]> = h
        .get_all(&headers::X_FORWARDED_FOR)
        .iter()
        .map(|v| v.as_bytes())
        .filter(|v| !v.iter().all(u8::is_ascii_whitespace))
        .collect();
    let xff = if incoming.is_empty() {
        conn.forwarded_for.clone()
    } else {
        let mut v = incoming.join(&b", "[..]);
        v.extend_from_slice(b", ");
        v.extend_from_slice(conn.forwarded_for.as_bytes());
        HeaderValue::from_bytes(&v).unwrap_or_else(|_| conn.forwarded_for.clone())
    };
    h.remove(&headers::X_FORWARDED_FOR);
    added.push_value(&headers::X_FORWARDED_FOR, &xff);
    let proto = h.remove(&headers::X_FORWARDED_PROTO);
    added.push_value(
        &headers::X_FORWARDED_PROTO,
        proto.as_ref().unwrap_or(scheme_value(conn.tls)),
    );
    let fhost = h.remove(&headers::X_FORWARDED_HOST);
    if let Some(v) = fhost.as_ref().or(host) {
        added.push_value(&headers::X_FORWARDED_HOST, v);
    }
}

/// Copies bytes both ways between an upgraded client connection and the
/// upgraded upstream connection until either side closes.
async fn tunnel(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            return;
        }
    };
    let mut client = hyper_util::rt::TokioIo::new(client);
    let mut upstream = hyper_util::rt::TokioIo::new(upstream);
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(error = %e, "upgraded connection closed");
    }
}

/// What [`Proxy::admit`] decided.
enum Admitted<'a> {
    /// Forward on this route, with the request's authority.
    Forward(&'a Route, Option<HeaderValue>),
    /// `OPTIONS` with `Max-Forwards: 0`: the proxy is the final recipient.
    OptionsHere,
}

/// `Max-Forwards` on `OPTIONS` (RFC 9110 7.6.2): true when it is `0` (the
/// proxy answers itself); otherwise a valid value is decremented for the
/// upstream. A value that is not a number is left as it came.
fn max_forwards(h: &mut HeaderMap) -> bool {
    let Some(v) = h.get(header::MAX_FORWARDS) else {
        return false;
    };
    let Some(n) = v.to_str().ok().and_then(|s| s.trim().parse::<u64>().ok()) else {
        return false;
    };
    if n == 0 {
        return true;
    }
    h.insert(header::MAX_FORWARDS, HeaderValue::from(n - 1));
    false
}

/// The proxy's own answer to `OPTIONS` with `Max-Forwards: 0`.
fn options_response() -> Response<RespBody> {
    let mut r = Response::new(Either::Right(Full::new(Bytes::new())));
    r.headers_mut().insert(header::ALLOW, ALLOW.clone());
    r
}

/// Characters escaped in `?next=`: everything but unreserved and `/`.
const NEXT_SET: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'/');

fn content_length(h: &HeaderMap) -> Option<u64> {
    if !headers::has(h, &header::CONTENT_LENGTH) {
        return None;
    }
    h.get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// HTTP/2 clients may split cookies over several headers; an HTTP/1.1
/// upstream expects one (RFC 9113 8.2.3).
fn join_cookies(h: &mut HeaderMap) {
    // No name repeated (the usual case): no second Cookie, and no lookup.
    if h.len() == h.keys_len() || h.get_all(header::COOKIE).iter().nth(1).is_none() {
        return;
    }
    let joined: Vec<u8> = h
        .get_all(header::COOKIE)
        .iter()
        .map(|v| v.as_bytes())
        .collect::<Vec<_>>()
        .join(&b"; "[..]);
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        h.insert(header::COOKIE, v);
    }
}

/// A `Set-Cookie` from the upstream for the session cookie is dropped.
fn drop_session_set_cookies(h: &mut HeaderMap, name: &str) {
    if !headers::has(h, &header::SET_COOKIE) {
        return;
    }
    if !h
        .get_all(header::SET_COOKIE)
        .iter()
        .any(|v| cookie::set_cookie_names(v, name))
    {
        return;
    }
    let keep: Vec<HeaderValue> = h
        .get_all(header::SET_COOKIE)
        .iter()
        .filter(|v| !cookie::set_cookie_names(v, name))
        .cloned()
        .collect();
    h.remove(header::SET_COOKIE);
    for v in keep {
        h.append(header::SET_COOKIE, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One request's future is moved whole into hyper's dispatcher on every
    /// request, so its size is a cost per request: 8,480 bytes before
    /// a005228, about 2,900 after (BENCHMARKS.md). A bound, so that it does
    /// not creep back unnoticed.
    #[test]
    fn the_future_of_a_request_stays_small() {
        fn output_size<A, B, C, F>(_: impl Fn(A, B, C) -> F) -> usize {
            std::mem::size_of::<F>()
        }
        let size = output_size(Proxy::handle);
        assert!(size <= 4096, "the request future is {size} bytes");
        // hyper's body with its protocol, no larger than hyper's body.
        assert_eq!(
            std::mem::size_of::<ClientBody>(),
            std::mem::size_of::<Option<hyper::body::Incoming>>()
        );
    }
}
