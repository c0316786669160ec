//! One worker's accept loop: a connection is served only with a permit of
//! `max_connections` (shared by all workers; more clients wait in the
//! kernel's backlog, and one per worker accepted and unread), accept errors back off and are logged at most once a
//! second, and at shutdown the worker stops accepting and drains its
//! connections within `shutdown_grace`.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::conn::{self, Worker};
use super::Shutdown;

/// The first pause after a failed accept, doubled on each failure in a row
/// up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

pub(super) struct Listener {
    pub(super) listener: TcpListener,
    /// The plain-HTTP listener that redirects to https (worker 0 only).
    pub(super) redirect: Option<TcpListener>,
    pub(super) worker: Arc<Worker>,
    /// `max_connections`, shared by every worker.
    pub(super) limit: Arc<Semaphore>,
    pub(super) grace: Duration,
}

impl Listener {
    /// Accepts until `shutdown`, then drains.
    pub(super) async fn run(mut self, shutdown: Shutdown) {
        // Every connection task, so the ones still open when the grace
        // period ends can be aborted before the store is flushed.
        let mut conns: JoinSet<()> = JoinSet::new();
        let mut errors = AcceptErrors::default();
        let stop = shutdown.wait();
        tokio::pin!(stop);
        loop {
            let accepted = tokio::select! {
                biased;
                () = &mut stop => break,
                r = self.listener.accept() => r.map(|(s, p)| (s, p, false)),
                r = accept_opt(&mut self.redirect) => r.map(|(s, p)| (s, p, true)),
            };
            while conns.try_join_next().is_some() {}
            match accepted {
                Ok((stream, peer, redirect)) => {
                    errors.succeeded();
                    // Accepted first, then the permit: each worker has its
                    // own backlog (SO_REUSEPORT), so a worker waiting for a
                    // permit before accepting could hold one while the
                    // waiting client sits in another worker's backlog. This
                    // way at most one connection per worker waits, unread.
                    let permit = tokio::select! {
                        biased;
                        () = &mut stop => break,
                        p = self.limit.clone().acquire_owned() => p.expect("the connection limit is never closed"),
                    };
                    let _ = stream.set_nodelay(true);
                    conns.spawn(conn::serve(
                        self.worker.clone(),
                        stream,
                        peer,
                        redirect,
                        permit,
                    ));
                }
                Err(e) => {
                    let pause = errors.failed(&e, Instant::now());
                    // Out of descriptors and the like: wait before trying
                    // again rather than spin.
                    tokio::select! {
                        biased;
                        () = &mut stop => break,
                        () = tokio::time::sleep(pause) => {}
                    }
                }
            }
        }
        drop(self.listener);
        drop(self.redirect);
        tracing::debug!(grace = ?self.grace, "listener closed; finishing its connections");
        self.worker.drain.start();
        let all_closed = async { while conns.join_next().await.is_some() {} };
        match tokio::time::timeout(self.grace, all_closed).await {
            Ok(()) => tracing::debug!("all connections of this worker closed"),
            Err(_) => {
                tracing::warn!(
                    open = conns.len(),
                    "shutdown grace period over; closing the remaining connections"
                );
                conns.abort_all();
            }
        }
        while conns.join_next().await.is_some() {}
    }
}

async fn accept_opt(l: &mut Option<TcpListener>) -> io::Result<(TcpStream, SocketAddr)> {
    match l {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

/// Failed accepts in a row: the pause before the next try, and a log line
/// at most once a second with the count of those not logged.
#[derive(Default)]
struct AcceptErrors {
    in_a_row: u32,
    last_logged: Option<Instant>,
    suppressed: u64,
}

impl AcceptErrors {
    fn succeeded(&mut self) {
        self.in_a_row = 0;
    }

    /// Logs `e` unless a line went out less than a second ago; returns the
    /// pause before the next accept.
    fn failed(&mut self, e: &io::Error, now: Instant) -> Duration {
        if let Some(suppressed) = self.note(now) {
            tracing::warn!(error = %e, suppressed, "accept failed (suppressed: failures not logged in the last second)");
        }
        let pause = MIN_BACKOFF.saturating_mul(1 << self.in_a_row.min(7));
        self.in_a_row = self.in_a_row.saturating_add(1);
        pause.min(MAX_BACKOFF)
    }

    /// `Some(failures not logged since the last line)` when this one is to
    /// be logged.
    fn note(&mut self, now: Instant) -> Option<u64> {
        match self.last_logged {
            Some(t) if now.duration_since(t) < Duration::from_secs(1) => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last_logged = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_errors_are_logged_once_a_second_with_a_count() {
        let mut e = AcceptErrors::default();
        let t0 = Instant::now();
        assert_eq!(e.note(t0), Some(0));
        for i in 1..=95 {
            assert_eq!(e.note(t0 + Duration::from_millis(i * 10)), None);
        }
        assert_eq!(e.note(t0 + Duration::from_millis(1000)), Some(95));
        assert_eq!(e.note(t0 + Duration::from_millis(1500)), None);
        assert_eq!(e.note(t0 + Duration::from_millis(2001)), Some(1));
    }

    #[test]
    fn accept_failures_back_off_up_to_a_second_and_reset() {
        let mut e = AcceptErrors::default();
        let err = io::Error::other("EMFILE");
        let now = Instant::now();
        let pauses: Vec<Duration> = (0..10).map(|_| e.failed(&err, now)).collect();
        assert_eq!(pauses[0], MIN_BACKOFF);
        assert_eq!(pauses[1], MIN_BACKOFF * 2);
        assert!(pauses.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(*pauses.last().unwrap(), MAX_BACKOFF);
        e.succeeded();
        assert_eq!(e.failed(&err, now), MIN_BACKOFF);
    }
}
