//! The stop signal of a running [`Server`](super::Server): triggered once
//! (by a signal, a test, later a reload), seen by every worker.

use tokio::sync::watch;

/// A shared stop flag. Cloning shares it; [`Shutdown::trigger`] from any
/// clone (or any thread) wakes every [`Shutdown::wait`].
#[derive(Clone, Debug)]
pub struct Shutdown {
    tx: std::sync::Arc<watch::Sender<bool>>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown::new()
    }
}

impl Shutdown {
    pub fn new() -> Shutdown {
        Shutdown {
            tx: std::sync::Arc::new(watch::Sender::new(false)),
        }
    }

    /// Asks every worker to stop accepting and drain.
    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }

    pub fn is_triggered(&self) -> bool {
        *self.tx.borrow()
    }

    /// Ready once [`Shutdown::trigger`] has been called (at once if it was).
    pub async fn wait(&self) {
        let mut rx = self.tx.subscribe();
        let _ = rx.wait_for(|stop| *stop).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_trigger_before_or_after_the_wait_is_seen() {
        let s = Shutdown::new();
        assert!(!s.is_triggered());
        let waiter = tokio::spawn({
            let s = s.clone();
            async move { s.wait().await }
        });
        s.clone().trigger();
        waiter.await.unwrap();
        assert!(s.is_triggered());
        s.wait().await;
    }
}
