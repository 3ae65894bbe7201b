//! Deployment modes: how a process discovers work. Chosen once per process
//! from `DEPLOYMENT_MODE`, never switched at run time.

use std::fmt;
use std::str::FromStr;

/// How a process discovers work (see DESIGN.md, "Deployment modes").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum DeploymentMode {
    /// LISTEN only, plus a catch-up claim at start and after every reconnect,
    /// and a timer for the earliest known future due time. Throughput replicas.
    EventDrivenOnly,
    /// A claim every poll interval, no LISTEN. Reliability replicas, and the mode
    /// for connection poolers (PgBouncer in transaction mode cannot LISTEN).
    PollingOnly,
    /// Both. Single-instance setups.
    Hybrid,
}

/// Why a `DEPLOYMENT_MODE` value was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected EventDrivenOnly, PollingOnly or Hybrid, found `{0}`")]
pub struct UnknownMode(pub String);

impl DeploymentMode {
    /// Every mode.
    pub const ALL: [DeploymentMode; 3] =
        [DeploymentMode::EventDrivenOnly, DeploymentMode::PollingOnly, DeploymentMode::Hybrid];

    /// The mode's name, as written in `DEPLOYMENT_MODE`.
    pub const fn as_str(self) -> &'static str {
        match self {
            DeploymentMode::EventDrivenOnly => "EventDrivenOnly",
            DeploymentMode::PollingOnly => "PollingOnly",
            DeploymentMode::Hybrid => "Hybrid",
        }
    }

    /// Whether this mode holds a LISTEN connection.
    pub const fn listens(self) -> bool {
        matches!(self, DeploymentMode::EventDrivenOnly | DeploymentMode::Hybrid)
    }

    /// Whether this mode claims on a timer.
    pub const fn polls(self) -> bool {
        matches!(self, DeploymentMode::PollingOnly | DeploymentMode::Hybrid)
    }
}

impl fmt::Display for DeploymentMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DeploymentMode {
    type Err = UnknownMode;

    /// Accepts the names as written (`EventDrivenOnly`), in any case, with or
    /// without `_`/`-` separators (`event_driven_only`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let folded: String = s.chars().filter(|c| !matches!(c, '_' | '-')).collect::<String>().to_ascii_lowercase();
        DeploymentMode::ALL
            .into_iter()
            .find(|mode| mode.as_str().to_ascii_lowercase() == folded)
            .ok_or_else(|| UnknownMode(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_plans_spelling_and_friendly_variants() {
        assert_eq!("EventDrivenOnly".parse(), Ok(DeploymentMode::EventDrivenOnly));
        assert_eq!("polling_only".parse(), Ok(DeploymentMode::PollingOnly));
        assert_eq!("HYBRID".parse(), Ok(DeploymentMode::Hybrid));
        assert!("EventDriven".parse::<DeploymentMode>().is_err());
        assert!("".parse::<DeploymentMode>().is_err());
    }

    #[test]
    fn modes_listen_and_poll_as_documented() {
        use DeploymentMode::*;
        assert!(EventDrivenOnly.listens() && !EventDrivenOnly.polls());
        assert!(!PollingOnly.listens() && PollingOnly.polls());
        assert!(Hybrid.listens() && Hybrid.polls());
    }
}
