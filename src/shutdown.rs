//! The shutdown signal, passed to every task that must stop.
//!
//! One [`Shutdown`] is created at start-up; clones share it. `trigger()` is
//! called by the signal handler (SIGTERM, SIGINT); tasks either poll
//! `is_triggered()` between units of work or `wait().await` alongside their
//! own futures. It is a closed channel underneath, so any number of waiters
//! wake at once and a late waiter returns immediately.

use smol::channel::{bounded, Receiver, Sender};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

/// A cloneable, one-way "stop now" signal.
#[derive(Clone, Debug)]
pub struct Shutdown {
    tx: Sender<()>,
    rx: Receiver<()>,
    at: Arc<OnceLock<Instant>>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    /// A new, untriggered signal.
    pub fn new() -> Shutdown {
        let (tx, rx) = bounded(1);
        Shutdown {
            tx,
            rx,
            at: Arc::default(),
        }
    }

    /// Triggers the signal; idempotent.
    pub fn trigger(&self) {
        let _ = self.at.set(Instant::now());
        self.tx.close();
    }

    /// When the signal was first triggered, if it was.
    pub fn triggered_at(&self) -> Option<Instant> {
        self.at.get().copied()
    }

    /// True once [`Shutdown::trigger`] has been called.
    pub fn is_triggered(&self) -> bool {
        self.rx.is_closed()
    }

    /// Resolves when the signal is triggered (at once if it already was).
    pub async fn wait(&self) {
        let _ = self.rx.recv().await;
    }

    /// Runs `f` until it completes (`Some`) or the signal is triggered
    /// (`None`; `f` is dropped, so it must be safe to abandon — e.g. work
    /// whose deliveries are not acked yet).
    pub async fn race<T>(&self, f: impl std::future::Future<Output = T>) -> Option<T> {
        smol::future::or(async { Some(f.await) }, async {
            self.wait().await;
            None
        })
        .await
    }

    /// Sleeps for `d`, or less if the signal is triggered meanwhile.
    /// Returns `true` when the full sleep elapsed, `false` on shutdown.
    pub async fn sleep(&self, d: std::time::Duration) -> bool {
        smol::future::or(
            async {
                async_io::Timer::after(d).await;
                true
            },
            async {
                self.wait().await;
                false
            },
        )
        .await
    }
}
