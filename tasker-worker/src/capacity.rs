//! How much work a worker takes on: the steps it holds claimed (a slot each,
//! from the claim until the outcome is recorded) and the handlers it runs at
//! once (its concurrency).
//!
//! A worker may hold more claimed steps than it runs handlers (prefetch): the
//! extra steps wait their turn, in claim order, and start as handlers finish.
//! Claims and completions then carry more steps each, so a step costs the
//! database less, without more handlers calling the services they call. How
//! many it holds beyond its concurrency follows its handlers' recent mean
//! time: only as many as it expects to start within `prefetch_wait`, and at
//! most `prefetch`. A worker whose handlers take seconds prefetches nothing,
//! so it never sits on steps another worker could start; a worker of
//! millisecond handlers holds up to `concurrency + prefetch`.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Weight of the newest handler time in the running mean (1/8).
const MEAN_SHIFT: u32 = 3;

/// A worker's slots and handler turns.
#[derive(Debug)]
pub struct Capacity {
    /// One permit per step held claimed; `size` in all.
    slots: Arc<Semaphore>,
    /// Serializes reservations, so that the claim loop and the completer,
    /// reserving at once, do not both take the same room under the limit.
    reserving: Mutex<()>,
    size: usize,
    concurrency: usize,
    prefetch: usize,
    prefetch_wait: Duration,
    /// One permit per handler running.
    turns: Arc<Semaphore>,
    /// Claimed steps waiting for a turn.
    waiting: Arc<AtomicUsize>,
    /// Running mean of handler time in nanoseconds; 0 before the first.
    mean_ns: AtomicU64,
}

impl Capacity {
    /// `concurrency` handlers at once (at least 1), and up to `prefetch`
    /// claimed steps more, as many as start within `prefetch_wait`.
    pub fn new(concurrency: usize, prefetch: usize, prefetch_wait: Duration) -> Self {
        let concurrency = concurrency.max(1);
        let prefetch = if prefetch_wait.is_zero() { 0 } else { prefetch };
        let size = concurrency.saturating_add(prefetch).min(Semaphore::MAX_PERMITS);
        Capacity {
            slots: Arc::new(Semaphore::new(size)),
            reserving: Mutex::new(()),
            size,
            concurrency,
            prefetch,
            prefetch_wait,
            turns: Arc::new(Semaphore::new(concurrency)),
            waiting: Arc::new(AtomicUsize::new(0)),
            mean_ns: AtomicU64::new(0),
        }
    }

    /// The most slots there are (concurrency plus the most prefetch).
    pub fn size(&self) -> usize {
        self.size
    }

    /// How many steps the worker may hold now: its concurrency, plus as many
    /// as its handlers' recent mean time lets start within the prefetch wait.
    /// Until a handler has run, nothing is prefetched.
    pub fn limit(&self) -> usize {
        let mean = u128::from(self.mean_ns.load(Ordering::Relaxed));
        let queued = if mean == 0 || self.prefetch == 0 {
            0
        } else {
            // The k-th waiting step starts after about k * mean / concurrency.
            let fits = self.concurrency as u128 * self.prefetch_wait.as_nanos() / mean;
            usize::try_from(fits).unwrap_or(usize::MAX).min(self.prefetch)
        };
        self.concurrency + queued
    }

    /// Slots held (steps claimed and not yet recorded, or reserved to claim).
    pub fn held(&self) -> usize {
        self.size - self.slots.available_permits()
    }

    /// Claimed steps waiting for a handler turn.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    /// Claimed steps whose handler has not returned yet: running, or
    /// waiting for a turn.
    pub fn unfinished(&self) -> usize {
        self.waiting() + self.concurrency.saturating_sub(self.turns.available_permits())
    }

    /// Up to `wanted` free slots within the limit, without waiting.
    pub fn reserve(&self, wanted: usize) -> Vec<OwnedSemaphorePermit> {
        let _one_at_a_time = self.reserving.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let room = self.limit().saturating_sub(self.held());
        std::iter::from_fn(|| Arc::clone(&self.slots).try_acquire_owned().ok()).take(wanted.min(room)).collect()
    }

    /// Of `own` slots the caller holds, how many it may claim with: the
    /// limit may have fallen since they were taken.
    pub fn usable(&self, own: usize) -> usize {
        let others = self.held().saturating_sub(own);
        self.limit().saturating_sub(others).min(own)
    }

    /// Waits for a handler turn (first come, first served, in the order the
    /// attempts ask, which is close to but not exactly the claim order).
    pub async fn turn(&self) -> OwnedSemaphorePermit {
        if let Ok(turn) = Arc::clone(&self.turns).try_acquire_owned() {
            return turn;
        }
        // Counted while waiting, however the wait ends (a cancelled attempt
        // drops this future).
        let _waiting = Waiting::new(&self.waiting);
        Arc::clone(&self.turns).acquire_owned().await.expect("the turns semaphore is never closed")
    }

    /// A handler ran for `elapsed`.
    pub fn observe(&self, elapsed: Duration) {
        let sample = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX).max(1);
        let _ = self.mean_ns.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |mean| {
            Some(if mean == 0 { sample } else { mean - (mean >> MEAN_SHIFT) + (sample >> MEAN_SHIFT) })
        });
    }

    /// Resolves once every slot is back (nothing claimed is left unrecorded).
    pub async fn all_returned(&self) {
        let all = u32::try_from(self.size).unwrap_or(u32::MAX);
        drop(self.slots.acquire_many(all).await.expect("the slots semaphore is never closed"));
    }
}

/// Counts one waiting step for as long as it lives.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Waiting(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_prefetched_before_a_handler_has_run() {
        let capacity = Capacity::new(4, 12, Duration::from_millis(10));
        assert_eq!(capacity.size(), 16);
        assert_eq!(capacity.limit(), 4);
        assert_eq!(capacity.reserve(100).len(), 4);
    }

    #[test]
    fn prefetch_follows_the_handlers_mean_time() {
        let capacity = Capacity::new(4, 12, Duration::from_millis(10));
        // 4 handlers of 5 ms start 8 waiting steps within 10 ms.
        capacity.observe(Duration::from_millis(5));
        assert_eq!(capacity.limit(), 4 + 8);
        // Fast handlers: the whole prefetch.
        let fast = Capacity::new(4, 12, Duration::from_millis(10));
        fast.observe(Duration::from_micros(50));
        assert_eq!(fast.limit(), 16);
        // Handlers slower than the wait: none.
        let slow = Capacity::new(4, 12, Duration::from_millis(10));
        slow.observe(Duration::from_secs(1));
        assert_eq!(slow.limit(), 4);
    }

    #[test]
    fn the_mean_moves_toward_recent_times() {
        let capacity = Capacity::new(4, 12, Duration::from_millis(10));
        capacity.observe(Duration::from_micros(50));
        assert_eq!(capacity.limit(), 16);
        for _ in 0..64 {
            capacity.observe(Duration::from_secs(1));
        }
        assert_eq!(capacity.limit(), 4, "handlers that became slow stop the prefetch");
    }

    #[test]
    fn slots_held_count_against_the_limit() {
        let capacity = Capacity::new(4, 12, Duration::from_millis(10));
        capacity.observe(Duration::from_millis(5));
        let held = capacity.reserve(10);
        assert_eq!(held.len(), 10);
        assert_eq!(capacity.reserve(10).len(), 2, "the limit is 12");
        // The limit falls: the caller's 10 may claim only what still fits.
        for _ in 0..64 {
            capacity.observe(Duration::from_secs(1));
        }
        assert_eq!(capacity.usable(10), 4);
        assert!(capacity.reserve(1).is_empty());
        drop(held);
        assert_eq!(capacity.held(), 0);
    }

    #[test]
    fn no_wait_means_no_prefetch() {
        let capacity = Capacity::new(4, 12, Duration::ZERO);
        capacity.observe(Duration::from_nanos(1));
        assert_eq!(capacity.size(), 4);
        assert_eq!(capacity.limit(), 4);
    }

    #[tokio::test]
    async fn waiting_steps_take_turns_in_order() {
        let capacity = Arc::new(Capacity::new(1, 3, Duration::from_millis(10)));
        capacity.observe(Duration::from_micros(1));
        let slots = capacity.reserve(4);
        assert_eq!(slots.len(), 4);
        let first = capacity.turn().await;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for i in 0..3 {
            let capacity = Arc::clone(&capacity);
            let tx = tx.clone();
            tokio::spawn(async move {
                let _turn = capacity.turn().await;
                tx.send(i).unwrap();
            });
            // Each waits before the next asks.
            tokio::task::yield_now().await;
        }
        assert_eq!(capacity.waiting(), 3);
        drop(first);
        let mut order = Vec::new();
        for _ in 0..3 {
            order.push(rx.recv().await.unwrap());
        }
        assert_eq!(order, vec![0, 1, 2]);
        assert_eq!(capacity.waiting(), 0);
    }

    #[tokio::test]
    async fn a_cancelled_wait_is_no_longer_counted() {
        let capacity = Arc::new(Capacity::new(1, 1, Duration::from_millis(10)));
        let _first = capacity.turn().await;
        let waiter = {
            let capacity = Arc::clone(&capacity);
            tokio::spawn(async move { drop(capacity.turn().await) })
        };
        tokio::task::yield_now().await;
        assert_eq!(capacity.waiting(), 1);
        waiter.abort();
        let _ = waiter.await;
        assert_eq!(capacity.waiting(), 0);
    }
}
