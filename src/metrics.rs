//! The Prometheus metrics of SPEC 7.2, written by `prometheus-client` in
//! the Prometheus text format (0.0.4).
//!
//! The request path touches only atomics: every label set a request can
//! need is resolved ahead of it ([`RouteMetrics`] per route, one slot per
//! status code created on first use) and the histograms are lock-free
//! ([`Histo`], fixed buckets from 100 µs to 10 s), so a request costs a few
//! `fetch_add`s and no lock, allocation or hash lookup.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

/// The `Content-Type` of `/metrics`.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// The route label of a request that matched no route.
pub const NO_ROUTE: &str = "-";

/// Upper bounds of the duration buckets, in seconds: 100 µs to 10 s.
pub const BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
const BUCKETS_NS: [u64; 16] = [
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// A histogram of durations with the fixed [`BUCKETS`], lock-free: one
/// `fetch_add` for the bucket and one for the sum per observation.
#[derive(Clone, Debug, Default)]
pub struct Histo(Arc<HistoInner>);

#[derive(Debug, Default)]
struct HistoInner {
    /// Observations per bucket (not cumulative); the last is `+Inf`.
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_ns: AtomicU64,
}

impl Histo {
    pub fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = BUCKETS_NS
            .iter()
            .position(|&b| ns <= b)
            .unwrap_or(BUCKETS.len());
        self.0.counts[i].fetch_add(1, Ordering::Relaxed);
        self.0.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// How many observations (the sum of the buckets, so that a scrape is
    /// consistent with itself).
    pub fn count(&self) -> u64 {
        self.0
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }
}

impl TypedMetric for Histo {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Histo {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let mut buckets = [(0.0, 0u64); BUCKETS.len() + 1];
        let mut count = 0;
        for (i, slot) in buckets.iter_mut().enumerate() {
            let n = self.0.counts[i].load(Ordering::Relaxed);
            count += n;
            *slot = (BUCKETS.get(i).copied().unwrap_or(f64::INFINITY), n);
        }
        let sum = self.0.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteStatus {
    route: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteKind {
    route: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabel {
    op: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabel {
    listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: String,
}

/// Why an upstream request failed (`sessiongate_upstream_errors_total{kind}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    Connect,
    Timeout,
    Protocol,
}

impl UpstreamErrorKind {
    const ALL: [UpstreamErrorKind; 3] = [
        UpstreamErrorKind::Connect,
        UpstreamErrorKind::Timeout,
        UpstreamErrorKind::Protocol,
    ];
    pub fn name(self) -> &'static str {
        match self {
            UpstreamErrorKind::Connect => "connect",
            UpstreamErrorKind::Timeout => "timeout",
            UpstreamErrorKind::Protocol => "protocol",
        }
    }
}

/// Why a session ended (`sessiongate_sessions_deleted_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteReason {
    Flush,
    Cycle,
    Expired,
    Revoked,
}

impl DeleteReason {
    const ALL: [DeleteReason; 4] = [
        DeleteReason::Flush,
        DeleteReason::Cycle,
        DeleteReason::Expired,
        DeleteReason::Revoked,
    ];
    pub fn name(self) -> &'static str {
        match self {
            DeleteReason::Flush => "flush",
            DeleteReason::Cycle => "cycle",
            DeleteReason::Expired => "expired",
            DeleteReason::Revoked => "revoked",
        }
    }
}

/// A store operation (`sessiongate_store_duration_seconds{op}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOp {
    Load,
    Create,
    Apply,
    Delete,
    ClearExpired,
    Ping,
    /// Ending a user's sessions (SPEC 9).
    Revoke,
}

impl StoreOp {
    const ALL: [StoreOp; 7] = [
        StoreOp::Load,
        StoreOp::Create,
        StoreOp::Apply,
        StoreOp::Delete,
        StoreOp::ClearExpired,
        StoreOp::Ping,
        StoreOp::Revoke,
    ];
    pub fn name(self) -> &'static str {
        match self {
            StoreOp::Load => "load",
            StoreOp::Create => "create",
            StoreOp::Apply => "apply",
            StoreOp::Delete => "delete",
            StoreOp::ClearExpired => "clear_expired",
            StoreOp::Ping => "ping",
            StoreOp::Revoke => "revoke",
        }
    }
}

/// A reload's outcome (`sessiongate_config_reloads_total{result}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadResult {
    Ok,
    Invalid,
    Refused,
}

impl ReloadResult {
    pub fn name(self) -> &'static str {
        match self {
            ReloadResult::Ok => "ok",
            ReloadResult::Invalid => "invalid",
            ReloadResult::Refused => "refused",
        }
    }
}

/// Status codes a counter slot exists for: 100 to 599.
const STATUS_MIN: u16 = 100;
const STATUS_SLOTS: usize = 500;

/// The handles of one route, resolved before any request.
pub struct RouteMetrics {
    name: String,
    requests: Family<RouteStatus, Counter>,
    by_status: Box<[OnceLock<Counter>]>,
    pub duration: Histo,
    pub upstream_duration: Histo,
    errors: [Counter; 3],
}

impl RouteMetrics {
    /// Counts one finished request with this status.
    pub fn request(&self, status: u16, took: Duration) {
        self.duration.observe(took);
        let slot = usize::from(status.saturating_sub(STATUS_MIN));
        match self.by_status.get(slot) {
            Some(c) => c.get_or_init(|| self.counter(status)).inc(),
            None => self.counter(status).inc(),
        };
    }

    fn counter(&self, status: u16) -> Counter {
        self.requests.get_or_create_owned(&RouteStatus {
            route: self.name.clone(),
            status: status.to_string(),
        })
    }

    pub fn upstream_error(&self, kind: UpstreamErrorKind) {
        self.errors[kind as usize].inc();
    }
}

/// Every metric of one running sessiongate and the registry that writes them.
pub struct Metrics {
    registry: Registry,
    requests: Family<RouteStatus, Counter>,
    request_duration: Family<RouteLabel, Histo>,
    upstream_duration: Family<RouteLabel, Histo>,
    upstream_errors: Family<RouteKind, Counter>,
    pub sessions_created: Counter,
    pub sessions_saved: Counter,
    deleted: [Counter; 4],
    pub sessions_interrupted: Counter,
    pub store_errors: Counter,
    store_ops: [Histo; 7],
    connections: Family<ListenerLabel, Gauge>,
    reloads: Family<ResultLabel, Counter>,
    pub access_log_dropped: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let requests = Family::<RouteStatus, Counter>::default();
        registry.register(
            "sessiongate_requests",
            "Requests answered, by route and status",
            requests.clone(),
        );
        let request_duration = Family::<RouteLabel, Histo>::default();
        registry.register(
            "sessiongate_request_duration_seconds",
            "Time from the request head to the response head, by route",
            request_duration.clone(),
        );
        let upstream_duration = Family::<RouteLabel, Histo>::default();
        registry.register(
            "sessiongate_upstream_duration_seconds",
            "Time the upstream took to send its response head, by route",
            upstream_duration.clone(),
        );
        let upstream_errors = Family::<RouteKind, Counter>::default();
        registry.register(
            "sessiongate_upstream_errors",
            "Upstream requests that failed, by route and kind (connect, timeout, protocol)",
            upstream_errors.clone(),
        );
        let sessions_created = Counter::default();
        registry.register(
            "sessiongate_sessions_created",
            "Sessions created",
            sessions_created.clone(),
        );
        let sessions_saved = Counter::default();
        registry.register(
            "sessiongate_sessions_saved",
            "Writes to an existing session",
            sessions_saved.clone(),
        );
        let deleted_family = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "sessiongate_sessions_deleted",
            "Sessions ended, by reason (flush, cycle, expired, revoked)",
            deleted_family.clone(),
        );
        let deleted = DeleteReason::ALL.map(|r| {
            deleted_family.get_or_create_owned(&ReasonLabel {
                reason: r.name().into(),
            })
        });
        let sessions_interrupted = Counter::default();
        registry.register(
            "sessiongate_sessions_interrupted",
            "Requests whose session was deleted by a concurrent request (400)",
            sessions_interrupted.clone(),
        );
        let store_errors = Counter::default();
        registry.register(
            "sessiongate_store_errors",
            "Store calls that failed",
            store_errors.clone(),
        );
        let ops_family = Family::<OpLabel, Histo>::default();
        registry.register(
            "sessiongate_store_duration_seconds",
            "Time of store calls, by operation",
            ops_family.clone(),
        );
        let store_ops = StoreOp::ALL.map(|op| {
            ops_family.get_or_create_owned(&OpLabel {
                op: op.name().into(),
            })
        });
        let connections = Family::<ListenerLabel, Gauge>::default();
        registry.register(
            "sessiongate_connections",
            "Client connections open, by listener",
            connections.clone(),
        );
        let reloads = Family::<ResultLabel, Counter>::default();
        registry.register(
            "sessiongate_config_reloads",
            "Configuration reloads, by result (ok, invalid, refused)",
            reloads.clone(),
        );
        for r in [
            ReloadResult::Ok,
            ReloadResult::Invalid,
            ReloadResult::Refused,
        ] {
            drop(reloads.get_or_create(&ResultLabel {
                result: r.name().into(),
            }));
        }
        let build = Family::<VersionLabel, Gauge>::default();
        registry.register(
            "sessiongate_build_info",
            "Always 1, labelled with the version",
            build.clone(),
        );
        build
            .get_or_create(&VersionLabel {
                version: env!("CARGO_PKG_VERSION").into(),
            })
            .set(1);
        let access_log_dropped = Counter::default();
        registry.register(
            "sessiongate_access_log_dropped",
            "Access log lines dropped because the writer fell behind",
            access_log_dropped.clone(),
        );
        Metrics {
            registry,
            requests,
            request_duration,
            upstream_duration,
            upstream_errors,
            sessions_created,
            sessions_saved,
            deleted,
            sessions_interrupted,
            store_errors,
            store_ops,
            connections,
            reloads,
            access_log_dropped,
        }
    }

    /// The handles of the route named `name` (the same series across
    /// reloads while the name stays).
    pub fn route(&self, name: &str) -> RouteMetrics {
        let label = RouteLabel { route: name.into() };
        RouteMetrics {
            name: name.into(),
            requests: self.requests.clone(),
            by_status: (0..STATUS_SLOTS).map(|_| OnceLock::new()).collect(),
            duration: self.request_duration.get_or_create_owned(&label),
            upstream_duration: self.upstream_duration.get_or_create_owned(&label),
            errors: UpstreamErrorKind::ALL.map(|k| {
                self.upstream_errors.get_or_create_owned(&RouteKind {
                    route: name.into(),
                    kind: k.name().into(),
                })
            }),
        }
    }

    pub fn session_deleted(&self, reason: DeleteReason) {
        self.deleted[reason as usize].inc();
    }

    pub fn sessions_deleted(&self, reason: DeleteReason, n: u64) {
        self.deleted[reason as usize].inc_by(n);
    }

    pub fn store_op(&self, op: StoreOp) -> &Histo {
        &self.store_ops[op as usize]
    }

    /// The gauge of open connections on `listener` (`"main"`, `"redirect"`, ...).
    pub fn connections(&self, listener: &str) -> Gauge {
        self.connections.get_or_create_owned(&ListenerLabel {
            listener: listener.into(),
        })
    }

    pub fn reload(&self, result: ReloadResult) {
        self.reloads
            .get_or_create(&ResultLabel {
                result: result.name().into(),
            })
            .inc();
    }

    /// Every metric in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(8192);
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
            .expect("writing to a String does not fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_bounded() {
        let m = Metrics::new();
        let r = m.route("app");
        r.request(200, Duration::from_micros(50));
        r.request(200, Duration::from_millis(3));
        r.request(404, Duration::from_secs(20));
        r.request(999, Duration::from_secs(1));
        assert_eq!(r.duration.count(), 4);
        let text = m.encode();
        for line in [
            r#"sessiongate_requests_total{route="app",status="200"} 2"#,
            r#"sessiongate_requests_total{route="app",status="404"} 1"#,
            r#"sessiongate_requests_total{route="app",status="999"} 1"#,
            r#"sessiongate_request_duration_seconds_bucket{route="app",le="0.0001"} 1"#,
            r#"sessiongate_request_duration_seconds_bucket{route="app",le="0.005"} 2"#,
            r#"sessiongate_request_duration_seconds_bucket{route="app",le="10"} 3"#,
            r#"sessiongate_request_duration_seconds_bucket{route="app",le="+Inf"} 4"#,
            r#"sessiongate_request_duration_seconds_count{route="app"} 4"#,
            r#"sessiongate_build_info{version=""#,
            r#"sessiongate_upstream_errors_total{route="app",kind="timeout"} 0"#,
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }

    #[test]
    fn the_same_route_name_shares_its_series() {
        let m = Metrics::new();
        m.route("a").request(200, Duration::ZERO);
        m.route("a").request(200, Duration::ZERO);
        m.route("a").upstream_error(UpstreamErrorKind::Connect);
        m.session_deleted(DeleteReason::Cycle);
        let text = m.encode();
        assert!(text.contains(r#"sessiongate_requests_total{route="a",status="200"} 2"#));
        assert!(text.contains(r#"sessiongate_upstream_errors_total{route="a",kind="connect"} 1"#));
        assert!(text.contains(r#"sessiongate_sessions_deleted_total{reason="cycle"} 1"#));
    }
}
