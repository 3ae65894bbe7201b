//! The invocation journal (`TASKER_WORKER_JOURNAL`): one line per handler
//! invocation, appended before the handler runs, so an audit (or a test) can
//! count how often each attempt really ran, independently of the database.
//!
//! Line format: `<step_uuid> <attempt> <handler> <instance_id>`.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use tasker_shared::claim::StepClaim;

/// An open journal file.
#[derive(Debug)]
pub struct Journal {
    file: Mutex<File>,
    instance: String,
}

impl Journal {
    /// Opens (or creates) `path` for appending.
    pub fn open(path: &Path, instance: &str) -> std::io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Journal { file: Mutex::new(file), instance: instance.to_owned() })
    }

    /// Appends one invocation. A write error is logged, not fatal: the
    /// journal is an audit aid, not part of processing.
    pub fn record(&self, claim: &StepClaim) {
        let line = format!("{} {} {} {}\n", claim.step_uuid, claim.attempt, claim.handler, self.instance);
        let written = match self.file.lock() {
            Ok(mut file) => file.write_all(line.as_bytes()),
            Err(poisoned) => poisoned.into_inner().write_all(line.as_bytes()),
        };
        if let Err(err) = written {
            tracing::warn!(error = %err, "could not write to the invocation journal");
        }
    }
}
