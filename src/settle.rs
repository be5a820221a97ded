//! Waiting for Identity Center's asynchronous assignment requests to settle.
//!
//! Polling each request with `DescribeAccountAssignment*Status` costs one sso-admin request
//! per poll, under a quota of 20 per second that the creations themselves share; polling
//! rarely instead holds one of the 15 creation slots for longer than the request needs. A
//! [`Settler`] does both jobs with one request: every `every` it lists the instance's requests
//! still in progress (`ListAccountAssignment*Status`), and wakes each waiting request that is
//! no longer listed, which then reads its own final status once. Where the listing is not
//! available (an older emulator, a missing permission), the first failure switches every
//! waiter back to polling its own status.

use crate::rate::is_throttling;
use crate::sso::{AssignmentApi, Operation};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;

/// Why a waiter was woken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Woken {
    /// The request was absent from a listing that started after it was registered: it has
    /// settled; read its final status.
    Settled,
    /// Listing is unavailable: poll the request's own status instead.
    PollYourself,
}

#[derive(Default)]
struct Waiters {
    /// Request id → (the listing generation it was registered in, its wake-up).
    waiting: BTreeMap<String, (u64, oneshot::Sender<Woken>)>,
    /// Listings started so far.
    generation: u64,
    /// False once listing has failed for a reason other than throttling.
    listing_works: bool,
}

/// One operation's poller and its waiters. Dropping the handle of [`Settler::spawn`] does not
/// stop the poller: call [`Settler::stop`].
pub struct Settler {
    sso: Arc<dyn AssignmentApi>,
    op: Operation,
    every: Duration,
    waiters: Mutex<Waiters>,
    wake: Notify,
}

fn lock(m: &Mutex<Waiters>) -> MutexGuard<'_, Waiters> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Settler {
    /// Starts a poller for `op` that lists in-progress requests every `every` while any
    /// request waits.
    pub fn spawn(
        sso: Arc<dyn AssignmentApi>,
        op: Operation,
        every: Duration,
    ) -> (Arc<Settler>, JoinHandle<()>) {
        let settler = Arc::new(Settler {
            sso,
            op,
            every,
            waiters: Mutex::new(Waiters {
                listing_works: true,
                ..Waiters::default()
            }),
            wake: Notify::new(),
        });
        let poller = tokio::spawn(settler.clone().poll());
        (settler, poller)
    }

    /// Waits until `request_id` has settled, or until listing turns out to be unavailable.
    pub async fn wait(&self, request_id: &str) -> Woken {
        let rx = {
            let mut w = lock(&self.waiters);
            if !w.listing_works {
                return Woken::PollYourself;
            }
            let (tx, rx) = oneshot::channel();
            let generation = w.generation;
            w.waiting.insert(request_id.to_string(), (generation, tx));
            rx
        };
        self.wake.notify_one();
        // A dropped sender means the poller is gone: fall back to polling.
        rx.await.unwrap_or(Woken::PollYourself)
    }

    /// Stops the poller; waiters still registered poll their own status.
    pub fn stop(&self, poller: JoinHandle<()>) {
        poller.abort();
        self.give_up();
    }

    fn give_up(&self) {
        let mut w = lock(&self.waiters);
        w.listing_works = false;
        for (_, (_, tx)) in std::mem::take(&mut w.waiting) {
            let _ = tx.send(Woken::PollYourself);
        }
    }

    async fn poll(self: Arc<Self>) {
        loop {
            let notified = self.wake.notified();
            if lock(&self.waiters).waiting.is_empty() {
                notified.await;
                continue;
            }
            tokio::time::sleep(self.every).await;
            let generation = {
                let mut w = lock(&self.waiters);
                w.generation += 1;
                w.generation
            };
            match self.sso.in_progress(self.op).await {
                Ok(running) => {
                    let mut w = lock(&self.waiters);
                    let settled: Vec<String> = w
                        .waiting
                        .iter()
                        .filter(|(id, (since, _))| *since < generation && !running.contains(*id))
                        .map(|(id, _)| id.clone())
                        .collect();
                    for id in settled {
                        if let Some((_, tx)) = w.waiting.remove(&id) {
                            let _ = tx.send(Woken::Settled);
                        }
                    }
                }
                Err(e) if is_throttling(&e) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cannot list assignment requests in progress; polling each request instead");
                    self.give_up();
                    return;
                }
            }
        }
    }
}
