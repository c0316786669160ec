//! The proxy's failures: one type for everything that ends a request with
//! an error response, and one function ([`ProxyError::status_and_body`])
//! that decides the status and the one-line body a client sees (SPEC 6).
//!
//! The client's faults (a broken or stalled request body, a bad `Host`)
//! are variants of their own, apart from the upstream's, so neither is
//! ever told as the other.

use std::io;
use std::time::Duration;

use http::StatusCode;

use super::h1::ProtocolError;
use super::headers::{Coding, HostError};
use super::path::PathError;
use crate::session::directives::DirectiveError;
use crate::store::signed::TooLarge as SignedTooLarge;
use crate::store::StoreError;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why the proxy answered a request itself with an error.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    // The client's request.
    #[error("{0} is not allowed")]
    MethodNotAllowed(&'static str),
    #[error("more than one Host header")]
    MultipleHosts,
    #[error("missing Host header")]
    MissingHost,
    #[error("invalid Host")]
    InvalidHost(#[source] HostError),
    #[error("invalid request path")]
    InvalidPath(#[source] PathError),
    #[error("invalid request target")]
    InvalidTarget,
    #[error("no route for this host and path")]
    NoRoute,
    #[error("request body larger than {0} bytes")]
    BodyTooLarge(u64),
    #[error("unsupported request transfer coding")]
    TransferCoding(#[source] Coding),
    #[error("request body broken")]
    ClientBody(#[source] BoxError),
    #[error("request body stalled for {0:?}")]
    ClientBodyTimeout(Duration),
    /// A request head hyper would refuse, answered by the connection
    /// layer: what is wrong.
    #[error("malformed request head: {0}")]
    MalformedHead(&'static str),
    /// Over 64 KiB or 100 fields.
    #[error("request head too large")]
    HeadTooLarge,

    // The upstream.
    #[error("upstream unreachable")]
    UpstreamConnect(#[source] BoxError),
    /// An https upstream's certificate failed verification (rustls's
    /// reason is the source: unknown issuer, name mismatch, expired).
    #[error("the upstream's TLS certificate was refused")]
    UpstreamCertificate(#[source] BoxError),
    #[error("upstream connection failed")]
    UpstreamIo(#[source] io::Error),
    #[error("invalid upstream response")]
    UpstreamProtocol(#[source] ProtocolError),
    #[error("the upstream closed the connection before {0}")]
    UpstreamClosed(&'static str),
    #[error("the upstream switched protocols without a WebSocket upgrade request")]
    UpstreamSwitched,
    #[error("the upstream upgrade failed")]
    UpstreamUpgrade(#[source] BoxError),
    #[error("upstream did not answer within {0:?}")]
    UpstreamTimeout(Duration),
    #[error("the upstream sent nothing more of the response body for {0:?}")]
    UpstreamReadTimeout(Duration),
    #[error("the request target is not valid for the upstream")]
    UpstreamTarget(#[source] http::uri::InvalidUri),
    #[error("invalid session directive from upstream")]
    Directive(#[source] Box<DirectiveError>),
    #[error("the session would be larger than max_session_size")]
    SessionTooLarge { size: usize, limit: u64 },
    #[error("the session is too large for signed cookies")]
    SignedTooLarge(#[source] SignedTooLarge),

    // The session.
    #[error("the session was deleted by a concurrent request")]
    Interrupted,
    #[error("the session store is unavailable")]
    Store(#[source] StoreError),
}

/// Large payloads are boxed: a `Result` of this type sits in the request's
/// future, moved whole at every step.
const _: () = assert!(std::mem::size_of::<ProxyError>() <= 32);

impl ProxyError {
    /// The status and the one-line body (without its newline) a client is
    /// answered with: the one place that decides them.
    pub fn status_and_body(&self) -> (StatusCode, String) {
        use ProxyError as E;
        let s = |status: StatusCode, body: &str| (status, body.to_string());
        match self {
            E::MethodNotAllowed(m) => (
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{m} is not supported by this proxy"),
            ),
            E::MultipleHosts => s(StatusCode::BAD_REQUEST, "more than one Host header"),
            E::MissingHost => s(StatusCode::BAD_REQUEST, "missing Host header"),
            E::InvalidHost(e) => (
                StatusCode::BAD_REQUEST,
                format!("invalid Host (or request authority): {e}"),
            ),
            E::InvalidPath(e) => (StatusCode::BAD_REQUEST, e.to_string()),
            E::InvalidTarget => s(StatusCode::BAD_REQUEST, "invalid request target"),
            E::NoRoute => s(StatusCode::NOT_FOUND, "no route for this host and path"),
            E::BodyTooLarge(n) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body larger than {n} bytes"),
            ),
            E::TransferCoding(c) => (
                StatusCode::NOT_IMPLEMENTED,
                format!("request transfer coding not supported: {c} (only chunked)"),
            ),
            E::ClientBody(e) => (
                StatusCode::BAD_REQUEST,
                format!("request body incomplete or badly framed: {}", one_line(&**e)),
            ),
            E::MalformedHead(why) => (
                StatusCode::BAD_REQUEST,
                format!("malformed request head: {why}"),
            ),
            E::HeadTooLarge => s(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "request head too large (over 64 KiB or 100 fields)",
            ),
            E::ClientBodyTimeout(d) => (
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "request body stalled: nothing received for {}s",
                    d.as_secs_f64()
                ),
            ),
            E::UpstreamConnect(_) => s(StatusCode::BAD_GATEWAY, "upstream unreachable"),
            E::UpstreamCertificate(_) => s(
                StatusCode::BAD_GATEWAY,
                "the upstream's TLS certificate was refused",
            ),
            E::UpstreamIo(_) | E::UpstreamUpgrade(_) => {
                s(StatusCode::BAD_GATEWAY, "upstream failed to answer")
            }
            E::UpstreamProtocol(ProtocolError::HeadTooLarge) => {
                s(StatusCode::BAD_GATEWAY, "upstream response head too large")
            }
            E::UpstreamProtocol(e) => (
                StatusCode::BAD_GATEWAY,
                format!("upstream sent an invalid response: {e}"),
            ),
            E::UpstreamClosed(what) => (
                StatusCode::BAD_GATEWAY,
                format!("upstream closed the connection before {what}"),
            ),
            E::UpstreamSwitched => s(
                StatusCode::BAD_GATEWAY,
                "upstream switched protocols without a WebSocket upgrade request",
            ),
            E::UpstreamTimeout(d) => (
                StatusCode::GATEWAY_TIMEOUT,
                format!("upstream did not answer within {}s", d.as_secs_f64()),
            ),
            E::UpstreamReadTimeout(d) => (
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "upstream sent nothing more of the response for {}s",
                    d.as_secs_f64()
                ),
            ),
            E::UpstreamTarget(_) => s(
                StatusCode::BAD_GATEWAY,
                "request target not valid for the upstream",
            ),
            E::Directive(e) => (
                StatusCode::BAD_GATEWAY,
                format!("invalid session directive from upstream: {e}"),
            ),
            E::SessionTooLarge { size, limit } => (
                StatusCode::BAD_GATEWAY,
                format!(
                    "the upstream's session change would make the session {size} bytes, over max_session_size ({limit} bytes); nothing was changed"
                ),
            ),
            E::SignedTooLarge(e) => (StatusCode::BAD_GATEWAY, e.to_string()),
            E::Interrupted => s(
                StatusCode::BAD_REQUEST,
                "the session was deleted by a concurrent request (logout or key change); its changes were not saved",
            ),
            E::Store(_) => s(
                StatusCode::SERVICE_UNAVAILABLE,
                "the session store is unavailable; try again shortly",
            ),
        }
    }

    /// Whether the client caused it (a 4xx): logged at debug, not warn.
    pub fn is_client_fault(&self) -> bool {
        self.status_and_body().0.is_client_error()
    }
}

impl From<io::Error> for ProxyError {
    fn from(e: io::Error) -> ProxyError {
        ProxyError::UpstreamIo(e)
    }
}

impl From<ProtocolError> for ProxyError {
    fn from(e: ProtocolError) -> ProxyError {
        ProxyError::UpstreamProtocol(e)
    }
}

/// An error and its causes on one line (no CR or LF from a cause).
pub fn one_line(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s.replace(['\r', '\n'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The variant's place in the enum: a new variant fails to compile
    /// here until it is added to the table below.
    fn ordinal(e: &ProxyError) -> usize {
        match e {
            ProxyError::MethodNotAllowed(..) => 0,
            ProxyError::MultipleHosts => 1,
            ProxyError::MissingHost => 2,
            ProxyError::InvalidHost(..) => 3,
            ProxyError::InvalidPath(..) => 4,
            ProxyError::InvalidTarget => 5,
            ProxyError::NoRoute => 6,
            ProxyError::BodyTooLarge(..) => 7,
            ProxyError::TransferCoding(..) => 8,
            ProxyError::ClientBody(..) => 9,
            ProxyError::ClientBodyTimeout(..) => 10,
            ProxyError::MalformedHead(..) => 11,
            ProxyError::HeadTooLarge => 12,
            ProxyError::UpstreamConnect(..) => 13,
            ProxyError::UpstreamCertificate(..) => 14,
            ProxyError::UpstreamIo(..) => 15,
            ProxyError::UpstreamProtocol(..) => 16,
            ProxyError::UpstreamClosed(..) => 17,
            ProxyError::UpstreamSwitched => 18,
            ProxyError::UpstreamUpgrade(..) => 19,
            ProxyError::UpstreamTimeout(..) => 20,
            ProxyError::UpstreamReadTimeout(..) => 21,
            ProxyError::UpstreamTarget(..) => 22,
            ProxyError::Directive(..) => 23,
            ProxyError::SessionTooLarge { .. } => 24,
            ProxyError::SignedTooLarge(..) => 25,
            ProxyError::Interrupted => 26,
            ProxyError::Store(..) => 27,
        }
    }

    /// Every variant, its status and its body: the table a reviewer reads
    /// to know what a client sees.
    #[test]
    fn every_error_maps_to_one_status_and_line() {
        let io = || io::Error::from(io::ErrorKind::ConnectionReset);
        let boxed = || -> BoxError { Box::new(io()) };
        let bad_uri = "a b".parse::<http::Uri>().unwrap_err();
        let table: Vec<(ProxyError, u16, &str)> = vec![
            (ProxyError::MethodNotAllowed("TRACE"), 405, "TRACE is not supported by this proxy"),
            (ProxyError::MultipleHosts, 400, "more than one Host header"),
            (ProxyError::MissingHost, 400, "missing Host header"),
            (ProxyError::InvalidHost(HostError::Userinfo), 400, "invalid Host (or request authority): the host carries userinfo"),
            (ProxyError::InvalidPath(PathError::AboveRoot), 400, "the request path climbs above the root"),
            (ProxyError::InvalidTarget, 400, "invalid request target"),
            (ProxyError::NoRoute, 404, "no route for this host and path"),
            (ProxyError::BodyTooLarge(10), 413, "request body larger than 10 bytes"),
            (ProxyError::TransferCoding(Coding("gzip".into())), 501, "request transfer coding not supported: gzip (only chunked)"),
            (ProxyError::ClientBody(boxed()), 400, "request body incomplete or badly framed: connection reset"),
            (ProxyError::ClientBodyTimeout(Duration::from_secs(60)), 408, "request body stalled: nothing received for 60s"),
            (ProxyError::MalformedHead("an invalid header field name"), 400, "malformed request head: an invalid header field name"),
            (ProxyError::HeadTooLarge, 431, "request head too large (over 64 KiB or 100 fields)"),
            (ProxyError::UpstreamConnect(boxed()), 502, "upstream unreachable"),
            (ProxyError::UpstreamCertificate(boxed()), 502, "the upstream's TLS certificate was refused"),
            (ProxyError::UpstreamIo(io()), 502, "upstream failed to answer"),
            (ProxyError::UpstreamProtocol(ProtocolError::HeadTooLarge), 502, "upstream response head too large"),
            (ProxyError::UpstreamProtocol(ProtocolError::ContentLength), 502, "upstream sent an invalid response: invalid Content-Length"),
            (ProxyError::UpstreamClosed("answering"), 502, "upstream closed the connection before answering"),
            (ProxyError::UpstreamSwitched, 502, "upstream switched protocols without a WebSocket upgrade request"),
            (ProxyError::UpstreamUpgrade(boxed()), 502, "upstream failed to answer"),
            (ProxyError::UpstreamTimeout(Duration::from_millis(1500)), 504, "upstream did not answer within 1.5s"),
            (ProxyError::UpstreamReadTimeout(Duration::from_secs(2)), 504, "upstream sent nothing more of the response for 2s"),
            (ProxyError::UpstreamTarget(bad_uri), 502, "request target not valid for the upstream"),
            (ProxyError::Directive(Box::new(DirectiveError { header: "X-Session-Update", problem: "not JSON".into() })), 502, "invalid session directive from upstream: X-Session-Update: not JSON"),
            (ProxyError::SessionTooLarge { size: 70000, limit: 65536 }, 502, "the upstream's session change would make the session 70000 bytes, over max_session_size (65536 bytes); nothing was changed"),
            (ProxyError::SignedTooLarge(SignedTooLarge { size: 9, limit: 8, cookies: 10 }), 502, "the session is too large for signed cookies: 9 bytes encoded, at most 8 fit in 10 cookies"),
            (ProxyError::SignedTooLarge(SignedTooLarge { size: 9, limit: 8, cookies: 1 }), 502, "the session is too large for signed cookies: 9 bytes encoded, at most 8 fit in one cookie (Django's format is not split)"),
            (ProxyError::Interrupted, 400, "the session was deleted by a concurrent request (logout or key change); its changes were not saved"),
            (ProxyError::Store(StoreError::Unavailable("down".into())), 503, "the session store is unavailable; try again shortly"),
        ];
        let mut covered: Vec<usize> = table.iter().map(|(e, _, _)| ordinal(e)).collect();
        covered.dedup();
        assert_eq!(
            covered,
            (0..28).collect::<Vec<_>>(),
            "every variant, once, in order"
        );
        for (e, status, body) in &table {
            let (st, b) = e.status_and_body();
            assert_eq!((st.as_u16(), b.as_str()), (*status, *body), "{e:?}");
            assert!(!b.contains(['\r', '\n']), "{e:?}");
        }
    }
}
