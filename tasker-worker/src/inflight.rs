//! The attempts a worker currently owns: running, or finished and waiting for
//! their outcome to be recorded. Heartbeats extend exactly these leases; a
//! lease the database refuses to extend cancels its attempt.

use std::collections::HashMap;
use std::sync::Mutex;

use tasker_shared::claim::AttemptRef;
use tokio_util::sync::CancellationToken;

#[derive(Debug)]
struct Entry {
    cancel: CancellationToken,
    finished: bool,
}

/// Attempts owned by this worker.
#[derive(Debug, Default)]
pub struct InFlight {
    attempts: Mutex<HashMap<AttemptRef, Entry>>,
}

impl InFlight {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<AttemptRef, Entry>> {
        self.attempts.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts tracking an attempt; returns the token that cancels it.
    pub fn insert(&self, attempt: AttemptRef) -> CancellationToken {
        let cancel = CancellationToken::new();
        self.lock().insert(attempt, Entry { cancel: cancel.clone(), finished: false });
        cancel
    }

    /// The handler returned; the outcome is on its way to the database.
    pub fn mark_finished(&self, attempt: &AttemptRef) {
        if let Some(entry) = self.lock().get_mut(attempt) {
            entry.finished = true;
        }
    }

    /// The outcome is recorded (or rejected): stop tracking.
    pub fn remove(&self, attempt: &AttemptRef) {
        self.lock().remove(attempt);
    }

    /// Every owned attempt, for a heartbeat.
    pub fn snapshot(&self) -> Vec<AttemptRef> {
        self.lock().keys().copied().collect()
    }

    /// The lease of `attempt` could not be extended: cancel it if it is still
    /// running. Returns true if a running attempt was cancelled.
    pub fn lose(&self, attempt: &AttemptRef) -> bool {
        match self.lock().get(attempt) {
            Some(entry) if !entry.finished => {
                entry.cancel.cancel();
                true
            }
            _ => false,
        }
    }

    /// Cancels every running attempt (shutdown deadline passed).
    pub fn cancel_all(&self) -> usize {
        let attempts = self.lock();
        let running: Vec<&Entry> = attempts.values().filter(|e| !e.finished).collect();
        for entry in &running {
            entry.cancel.cancel();
        }
        running.len()
    }

    /// How many attempts are owned.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none are owned.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
