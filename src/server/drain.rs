//! Graceful shutdown of one worker's connections.
//!
//! hyper-util's `GracefulShutdown` polls a watch channel (a lock and a
//! `Notified` future) on every wakeup of every connection: about 480
//! instructions per proxied request. Here a connection registers its task's
//! waker once, and each later wakeup costs one atomic load and a pointer
//! comparison. On [`Drain::start`] every connection is woken and told to
//! finish its request in flight and close (hyper's `graceful_shutdown`,
//! called by the connection's watchdog in `conn.rs`).
//! Waiting for them is the caller's (the worker joins its connection tasks).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

/// The drain signal of one worker. Cloning shares it.
#[derive(Clone, Default)]
pub struct Drain {
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    draining: AtomicBool,
    wakers: Mutex<Wakers>,
}

#[derive(Default)]
struct Wakers {
    slots: Vec<Option<Waker>>,
    free: Vec<usize>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Wakers> {
        // Every change under the lock is a single slot write: a panic while
        // holding it leaves the table consistent.
        self.wakers.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drain {
    /// A connection's place in the drain: see [`Registration::poll_draining`].
    pub fn register(&self) -> Registration {
        Registration::new(self.shared.clone())
    }

    /// Ready once the drain has started: for work that should simply stop
    /// then, such as a TLS handshake.
    pub fn started(&self) -> Started {
        Started {
            reg: Registration::new(self.shared.clone()),
        }
    }

    /// Tells every watched connection, present and future, to close after
    /// its request in flight.
    pub fn start(&self) {
        self.shared.draining.store(true, Ordering::SeqCst);
        let woken: Vec<Waker> = self
            .shared
            .lock()
            .slots
            .iter_mut()
            .filter_map(Option::take)
            .collect();
        for w in woken {
            w.wake();
        }
    }
}

/// A task's place in a drain's waker table.
pub struct Registration {
    shared: Arc<Shared>,
    /// The slot in the waker table, once registered.
    slot: Option<usize>,
    /// The waker registered, to notice a change without the lock.
    waker: Option<Waker>,
}

impl Registration {
    fn new(shared: Arc<Shared>) -> Registration {
        Registration {
            shared,
            slot: None,
            waker: None,
        }
    }

    /// Whether the drain has started; if not, the task of `cx` is woken
    /// when it does.
    pub fn poll_draining(&mut self, cx: &mut Context<'_>) -> bool {
        if self.shared.draining.load(Ordering::Acquire) {
            return true;
        }
        if self.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            return false;
        }
        {
            let mut w = self.shared.lock();
            let i = match self.slot {
                Some(i) => i,
                None => {
                    let i = w.free.pop().unwrap_or_else(|| {
                        w.slots.push(None);
                        w.slots.len() - 1
                    });
                    self.slot = Some(i);
                    i
                }
            };
            w.slots[i] = Some(cx.waker().clone());
        }
        self.waker = Some(cx.waker().clone());
        // A drain that started before the waker was in the table did not
        // wake it: look again.
        self.shared.draining.load(Ordering::SeqCst)
    }

    pub fn release(&mut self) {
        if let Some(i) = self.slot.take() {
            let mut w = self.shared.lock();
            w.slots[i] = None;
            w.free.push(i);
        }
        self.waker = None;
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.release();
    }
}

/// Ready once the drain has started (see [`Drain::started`]).
pub struct Started {
    reg: Registration,
}

impl Future for Started {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        match self.get_mut().reg.poll_draining(cx) {
            true => Poll::Ready(()),
            false => Poll::Pending,
        }
    }
}
