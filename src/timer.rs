//! Coarse timers for the per-request timeouts of one worker.
//!
//! Every request arms two timeouts that almost never fire: hyper's
//! header-read timeout for the next request on the connection, and the
//! upstream timeout. With tokio's timers each one is an entry inserted into
//! and removed from tokio's timer wheel, with its own state to keep in
//! step. Here a timer is a slot in a small table checked by one ticker task
//! every [`TICK`], as nginx checks its timers once per event-loop turn:
//! arming costs a clock read, an uncontended lock and a waker clone (hyper
//! still boxes its header-read timer). Measured: about 450 fewer
//! instructions per request.
//!
//! The price is precision: a timer fires after its duration, never before,
//! and at most one tick (0.1 s) plus however late the ticker runs after it.
//! Durations here are seconds (`header_read_timeout`, `upstream_timeout`).
//!
//! The clock is tokio's, so tests that pause time drive these timers too.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};

/// How often due timers are checked.
pub const TICK: Duration = Duration::from_millis(100);

/// The timers of one worker. Cloning shares them.
#[derive(Clone)]
pub struct Wheel {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
}

struct State {
    /// Time at the last tick (or at the last poll while no ticker runs):
    /// never later than the real time, so a timer compared against it is
    /// never early.
    now: Instant,
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// A ticker task is running for this wheel.
    ticking: bool,
}

struct Slot {
    due: Instant,
    waker: Option<Waker>,
    used: bool,
    generation: u32,
}

/// The error of [`Wheel::timeout`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

impl Default for Wheel {
    fn default() -> Self {
        Wheel::new()
    }
}

impl Wheel {
    pub fn new() -> Wheel {
        Wheel {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    now: Instant::now(),
                    slots: Vec::new(),
                    free: Vec::new(),
                    ticking: false,
                }),
            }),
        }
    }

    /// A timer that fires `duration` from now (plus at most about a tick).
    pub fn sleep(&self, duration: Duration) -> Sleep {
        self.sleep_until(after(Instant::now(), duration))
    }

    pub fn sleep_until(&self, deadline: Instant) -> Sleep {
        Sleep {
            inner: self.inner.clone(),
            due: deadline,
            slot: None,
            fired: false,
        }
    }

    /// `fut`, or [`Elapsed`] when it has not finished within `duration`,
    /// counted from this call (as `tokio::time::timeout`), not from the
    /// first poll.
    ///
    /// A plain struct rather than an `async fn`: an `async fn` keeps its
    /// argument and the pinned copy of it side by side, which doubled the
    /// size of the upstream request future (and every move of it).
    pub fn timeout<F: Future>(&self, duration: Duration, fut: F) -> Timeout<F> {
        Timeout {
            fut,
            sleep: self.sleep(duration),
        }
    }

    /// Timers armed and not yet dropped (for tests).
    pub fn armed(&self) -> usize {
        self.inner.lock().slots.iter().filter(|s| s.used).count()
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the table consistent (every
        // change is a single field write), so a poisoned lock is used as is.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pin_project_lite::pin_project! {
    /// [`Wheel::timeout`]: the future's output, or [`Elapsed`].
    pub struct Timeout<F> {
        #[pin]
        fut: F,
        sleep: Sleep,
    }
}

impl<F: Future> Future for Timeout<F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(v) = this.fut.poll(cx) {
            return Poll::Ready(Ok(v));
        }
        match Pin::new(this.sleep).poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(Elapsed)),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// One timer of a [`Wheel`]. Not armed until first polled.
pub struct Sleep {
    inner: Arc<Inner>,
    due: Instant,
    /// Index and generation of the slot, once armed.
    slot: Option<(u32, u32)>,
    fired: bool,
}

impl Future for Sleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if this.fired {
            return Poll::Ready(());
        }
        let mut st = this.inner.lock();
        if !st.ticking {
            st.now = Instant::now();
        }
        if st.now >= this.due {
            if let Some((i, _)) = this.slot.take() {
                st.release(i);
            }
            this.fired = true;
            return Poll::Ready(());
        }
        match this.slot {
            Some((i, g)) if st.slots[i as usize].generation == g => {
                let slot = &mut st.slots[i as usize];
                match &slot.waker {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => slot.waker = Some(cx.waker().clone()),
                }
            }
            _ => {
                let slot = Slot {
                    due: this.due,
                    waker: Some(cx.waker().clone()),
                    used: true,
                    generation: 0,
                };
                let i = match st.free.pop() {
                    Some(i) => {
                        let s = &mut st.slots[i as usize];
                        let generation = s.generation;
                        *s = Slot { generation, ..slot };
                        i
                    }
                    None => {
                        st.slots.push(slot);
                        (st.slots.len() - 1) as u32
                    }
                };
                this.slot = Some((i, st.slots[i as usize].generation));
                if !st.ticking {
                    st.ticking = true;
                    drop(st);
                    // The guard exists before the task: if the task is
                    // dropped unpolled (its runtime ending, or no runtime),
                    // the flag is still cleared.
                    tokio::spawn(ticker(Stopped(Arc::downgrade(&this.inner))));
                }
            }
        }
        Poll::Pending
    }
}

impl Drop for Sleep {
    fn drop(&mut self) {
        if let Some((i, g)) = self.slot {
            let mut st = self.inner.lock();
            if st.slots[i as usize].generation == g {
                st.release(i);
            }
        }
    }
}

impl hyper::rt::Sleep for Sleep {}

impl State {
    fn release(&mut self, i: u32) {
        let s = &mut self.slots[i as usize];
        s.used = false;
        s.waker = None;
        s.generation = s.generation.wrapping_add(1);
        self.free.push(i);
    }
}

/// `at + d`, or a moment about 30 years on when that is past what the clock
/// can hold (as tokio does for a far deadline).
fn after(at: Instant, d: Duration) -> Instant {
    at.checked_add(d)
        .unwrap_or_else(|| at + Duration::from_secs(86400 * 365 * 30))
}

/// Marks the wheel as without a ticker when the ticker task ends, even by
/// its runtime shutting down, so the next timer starts another.
struct Stopped(Weak<Inner>);

impl Drop for Stopped {
    fn drop(&mut self) {
        if let Some(inner) = self.0.upgrade() {
            inner.lock().ticking = false;
        }
    }
}

/// Wakes the due timers of a wheel every tick, while the wheel exists.
async fn ticker(stopped: Stopped) {
    let wheel = stopped.0.clone();
    let mut every = tokio::time::interval(TICK);
    every.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut due = Vec::new();
    loop {
        every.tick().await;
        let Some(inner) = wheel.upgrade() else { return };
        {
            let mut st = inner.lock();
            let now = Instant::now();
            st.now = now;
            for s in st.slots.iter_mut().filter(|s| s.used && s.due <= now) {
                due.extend(s.waker.take());
            }
        }
        for w in due.drain(..) {
            w.wake();
        }
    }
}

/// hyper's timer for the HTTP/1 header-read timeout.
impl hyper::rt::Timer for Wheel {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(Wheel::sleep(self, duration))
    }

    fn sleep_until(&self, deadline: std::time::Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(Wheel::sleep_until(self, Instant::from_std(deadline)))
    }

    fn now(&self) -> std::time::Instant {
        Instant::now().into_std()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn fires_after_its_duration_and_within_a_tick() {
        let wheel = Wheel::new();
        let start = Instant::now();
        tokio::time::timeout(Duration::from_secs(10), wheel.sleep(Duration::from_secs(3)))
            .await
            .expect("the timer fires");
        let took = start.elapsed();
        assert!(took >= Duration::from_secs(3), "{took:?}");
        assert!(took <= Duration::from_secs(3) + TICK, "{took:?}");
        assert_eq!(wheel.armed(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn timeout_passes_the_value_through_or_elapses() {
        let wheel = Wheel::new();
        let quick = wheel
            .timeout(Duration::from_secs(1), async {
                tokio::time::sleep(Duration::from_millis(500)).await;
                7
            })
            .await;
        assert_eq!(quick, Ok(7));
        assert_eq!(wheel.armed(), 0, "the finished timeout's slot is freed");
        let slow = wheel.timeout(Duration::from_secs(1), std::future::pending::<()>());
        let slow = tokio::time::timeout(Duration::from_secs(10), slow).await;
        assert_eq!(slow, Ok(Err(Elapsed)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_timer_frees_its_slot_for_the_next() {
        let wheel = Wheel::new();
        for _ in 0..100 {
            let r = wheel
                .timeout(Duration::from_secs(5), tokio::task::yield_now())
                .await;
            assert_eq!(r, Ok(()));
        }
        assert_eq!(wheel.armed(), 0);
        assert!(wheel.inner.lock().slots.len() <= 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_wheel_does_not_date_new_timers_from_its_creation() {
        let wheel = Wheel::new();
        tokio::time::sleep(Duration::from_secs(3600)).await;
        let r = wheel
            .timeout(
                Duration::from_secs(10),
                tokio::time::sleep(Duration::from_secs(5)),
            )
            .await;
        assert_eq!(r, Ok(()), "a timer armed an hour after the wheel was made");
    }

    #[tokio::test(start_paused = true)]
    async fn armed_between_ticks_is_not_early() {
        let wheel = Wheel::new();
        // Start the ticker, then arm a timer half a tick after a tick.
        let mut keep = wheel.sleep(Duration::from_secs(60));
        std::future::poll_fn(|cx| {
            let _ = Pin::new(&mut keep).poll(cx);
            Poll::Ready(())
        })
        .await;
        tokio::time::sleep(TICK + TICK / 2).await;
        let start = Instant::now();
        let fired =
            tokio::time::timeout(Duration::from_secs(5), wheel.sleep(Duration::from_secs(1)));
        fired.await.expect("the timer fires");
        let took = start.elapsed();
        assert!(took >= Duration::from_secs(1), "early: {took:?}");
        assert!(took <= Duration::from_secs(1) + TICK, "{took:?}");
    }

    #[test]
    fn a_ticker_dropped_before_it_ran_does_not_stop_the_wheel() {
        let wheel = Wheel::new();
        let rt = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap()
        };
        // Arm a timer (spawning the ticker) and end the runtime before the
        // ticker is ever polled.
        let first = rt();
        let mut armed = wheel.sleep(Duration::from_secs(60));
        first.block_on(std::future::poll_fn(|cx| {
            assert!(Pin::new(&mut armed).poll(cx).is_pending());
            Poll::Ready(())
        }));
        drop(first);
        let r = rt().block_on(async {
            tokio::time::timeout(
                Duration::from_secs(5),
                wheel.timeout(Duration::from_millis(200), std::future::pending::<()>()),
            )
            .await
        });
        assert_eq!(r, Ok(Err(Elapsed)), "a later timer fires");
    }

    #[test]
    fn a_far_deadline_does_not_overflow() {
        let now = Instant::now();
        assert!(after(now, Duration::MAX) > now + Duration::from_secs(86400 * 365));
    }

    #[test]
    fn a_runtime_that_ends_leaves_the_wheel_usable_by_the_next() {
        let wheel = Wheel::new();
        for _ in 0..2 {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap();
            let r =
                rt.block_on(wheel.timeout(Duration::from_secs(1), std::future::pending::<()>()));
            assert_eq!(r, Err(Elapsed));
        }
    }
}
