//! One worker's accept loop: a connection is served only with a permit of
//! `max_connections` (shared by all workers; more clients wait in the
//! kernel's backlog, and one per worker accepted and unread), accept errors back off and are logged at most once a
//! second, and at shutdown the worker stops accepting and drains its
//! connections within `shutdown_grace`. A reload that moves `listen` or
//! `redirect_http` hands the worker its new socket: the old one is closed
//! at once and its connections drained the same way, apart from the rest.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::conn::{self, Worker};
use super::drain::Drain;
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
    /// Sockets a reload bound for this worker (SPEC 7.1).
    pub(super) rebinds: mpsc::UnboundedReceiver<Rebound>,
}

/// What a reload changed of a worker's listeners.
pub(super) struct Rebound {
    /// The new `listen` socket, when it moved.
    pub(super) listen: Option<TcpListener>,
    /// The new `redirect_http` socket (`Some(None)`: none any more), when
    /// it changed.
    pub(super) redirect: Option<Option<TcpListener>>,
    /// Told once the old sockets are closed and the new ones serve.
    pub(super) done: Option<tokio::sync::oneshot::Sender<()>>,
}

/// The connections accepted from one socket, drained together.
#[derive(Default)]
struct Accepted {
    drain: Drain,
    conns: JoinSet<()>,
}

impl Accepted {
    /// The socket they came from is closed: they finish their requests in
    /// flight and close, within `grace`, in a task of their own.
    fn retire(self, retired: &mut JoinSet<()>, grace: Duration) {
        let Accepted { drain, mut conns } = self;
        drain.start();
        retired.spawn(async move {
            let all_closed = async { while conns.join_next().await.is_some() {} };
            if tokio::time::timeout(grace, all_closed).await.is_err() {
                tracing::warn!(
                    open = conns.len(),
                    "grace period over for the connections of a closed listener; closing them"
                );
                conns.abort_all();
                while conns.join_next().await.is_some() {}
            }
        });
    }
}

impl Listener {
    /// Accepts until `shutdown`, then drains.
    pub(super) async fn run(mut self, shutdown: Shutdown) {
        // Every connection task, so the ones still open when the grace
        // period ends can be aborted before the store is flushed: those of
        // `listen`, of `redirect_http`, and of sockets a reload closed.
        let mut main = Accepted::default();
        let mut redirected = Accepted::default();
        let mut retired: JoinSet<()> = JoinSet::new();
        let mut errors = AcceptErrors::default();
        let stop = shutdown.wait();
        tokio::pin!(stop);
        loop {
            let accepted = tokio::select! {
                biased;
                () = &mut stop => break,
                Some(r) = self.rebinds.recv() => {
                    if let Some(l) = r.listen {
                        // The old socket closes here: new clients are
                        // refused on it, its connections drain.
                        self.listener = l;
                        std::mem::take(&mut main).retire(&mut retired, self.grace);
                    }
                    if let Some(l) = r.redirect {
                        self.redirect = l;
                        std::mem::take(&mut redirected).retire(&mut retired, self.grace);
                    }
                    if let Some(done) = r.done {
                        let _ = done.send(());
                    }
                    continue;
                }
                r = self.listener.accept() => r.map(|(s, p)| (s, p, false)),
                r = accept_opt(&mut self.redirect) => r.map(|(s, p)| (s, p, true)),
                // A finished connection's task keeps its allocation (the
                // size of `conn::serve`'s future, about 8 KB) until it is
                // joined: joined as it ends, not at the next accept, so the
                // memory of a burst goes back when the burst closes.
                Some(_) = main.conns.join_next(), if !main.conns.is_empty() => continue,
                Some(_) = redirected.conns.join_next(), if !redirected.conns.is_empty() => continue,
                Some(_) = retired.join_next(), if !retired.is_empty() => continue,
            };
            while main.conns.try_join_next().is_some() {}
            while redirected.conns.try_join_next().is_some() {}
            while retired.try_join_next().is_some() {}
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
                    let to = if redirect { &mut redirected } else { &mut main };
                    to.conns.spawn(conn::serve(
                        self.worker.clone(),
                        stream,
                        peer,
                        redirect,
                        permit,
                        to.drain.clone(),
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
        main.drain.start();
        redirected.drain.start();
        let deadline = Instant::now() + self.grace;
        let (mut conns, mut others) = (main.conns, redirected.conns);
        let all_closed = async {
            while conns.join_next().await.is_some() {}
            while others.join_next().await.is_some() {}
        };
        match tokio::time::timeout(self.grace, all_closed).await {
            Ok(()) => tracing::debug!("all connections of this worker closed"),
            Err(_) => {
                tracing::warn!(
                    open = conns.len() + others.len(),
                    "shutdown grace period over; closing the remaining connections"
                );
                conns.abort_all();
                others.abort_all();
            }
        }
        while conns.join_next().await.is_some() {}
        while others.join_next().await.is_some() {}
        // Requests whose client went away run on to their end (their
        // session changes saved), within what is left of the grace period;
        // past it they are cancelled with the worker's runtime (with
        // `workers: 0`, the caller's runtime: there they run on until it
        // ends, their store writes failing once the store is flushed).
        let abandoned = &self.worker.abandoned;
        abandoned.close();
        if tokio::time::timeout_at(deadline, abandoned.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                running = abandoned.len(),
                "shutdown grace period over; cancelling the requests whose clients went away"
            );
        }
        // Those of closed sockets: already draining, each within its grace.
        while retired.join_next().await.is_some() {}
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
