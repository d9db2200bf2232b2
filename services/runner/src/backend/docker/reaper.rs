//! Removes finished job containers once their keep time is over.
//!
//! A workload removes its own container at once when the policy keeps
//! none; everything else — failed containers kept for inspection, and
//! containers left behind by a runner that died — is found here, by the
//! `trainmesh.job` label, on a timer. The engine is the only record, so a
//! restarted runner cleans up after its predecessor.

use std::collections::HashMap;
use std::time::Duration;

use bollard::query_parameters::{ListContainersOptions, RemoveContainerOptions};
use bollard::Docker;
use chrono::{DateTime, Utc};
use tokio::task::JoinHandle;

use super::errors;
use super::spec::LABEL_JOB;

/// A finished container is never removed sooner than this by the reaper:
/// its attempt may still be reading its result.
pub const MIN_AGE: Duration = Duration::from_secs(300);
const MAX_INTERVAL: Duration = Duration::from_secs(60);
const MIN_INTERVAL: Duration = Duration::from_secs(1);

/// How long finished containers are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeepPolicy {
    pub succeeded: Duration,
    pub failed: Duration,
}

impl KeepPolicy {
    /// Whether a container that exited with `exit_code` at `finished_at`
    /// is due for removal at `now`.
    pub fn due(&self, exit_code: i64, finished_at: DateTime<Utc>, now: DateTime<Utc>) -> bool {
        let keep = if exit_code == 0 {
            self.succeeded
        } else {
            self.failed
        };
        let keep = keep.max(MIN_AGE);
        match (now - finished_at).to_std() {
            Ok(age) => age >= keep,
            // Finished "in the future": clocks disagree; keep it.
            Err(_) => false,
        }
    }
}

/// Stops the reaper when dropped (with the backend that owns it).
pub struct Reaper(JoinHandle<()>);

impl Drop for Reaper {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts sweeping every job container of the engine, at once and then
/// periodically.
pub fn spawn(docker: Docker, policy: KeepPolicy) -> Reaper {
    let interval =
        (policy.failed.min(policy.succeeded.max(MIN_AGE)) / 2).clamp(MIN_INTERVAL, MAX_INTERVAL);
    Reaper(tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match sweep(&docker, LABEL_JOB, policy, Utc::now()).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(removed = n, "removed finished job containers"),
                Err(e) => tracing::warn!(error = %e, "cannot sweep finished job containers"),
            }
        }
    }))
}

/// Removes the finished containers matching the label filter `label`
/// (`key` or `key=value`) that are due at `now`; returns how many.
pub async fn sweep(
    docker: &Docker,
    label: &str,
    policy: KeepPolicy,
    now: DateTime<Utc>,
) -> Result<usize, bollard::errors::Error> {
    let filters = HashMap::from([
        ("label".to_owned(), vec![label.to_owned()]),
        (
            "status".to_owned(),
            vec!["exited".to_owned(), "dead".to_owned()],
        ),
    ]);
    let options = ListContainersOptions {
        all: true,
        filters: Some(filters),
        ..ListContainersOptions::default()
    };
    let mut removed = 0;
    for summary in docker.list_containers(Some(options)).await? {
        let Some(id) = summary.id else { continue };
        // The summary has no exit time: ask for it.
        let info = match docker.inspect_container(&id, None).await {
            Ok(i) => i,
            Err(e) if errors::is_not_found(&e) => continue,
            Err(e) => return Err(e),
        };
        let state = info.state.unwrap_or_default();
        let finished = state
            .finished_at
            .as_deref()
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&Utc));
        let Some(finished) = finished else { continue };
        if !policy.due(state.exit_code.unwrap_or(-1), finished, now) {
            continue;
        }
        let options = RemoveContainerOptions {
            force: true,
            ..RemoveContainerOptions::default()
        };
        match docker.remove_container(&id, Some(options)).await {
            Ok(()) => removed += 1,
            Err(e) if errors::is_not_found(&e) => {}
            Err(e) => {
                tracing::warn!(container = %id, error = %e, "cannot remove a finished container")
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_containers_are_kept_longer_than_succeeded_ones() {
        let policy = KeepPolicy {
            succeeded: Duration::ZERO,
            failed: Duration::from_secs(3600),
        };
        let now = Utc::now();
        let ago = |s: i64| now - chrono::Duration::seconds(s);
        // Never before MIN_AGE, whatever the policy.
        assert!(!policy.due(0, ago(10), now));
        assert!(policy.due(0, ago(301), now));
        assert!(!policy.due(1, ago(301), now));
        assert!(!policy.due(137, ago(3599), now));
        assert!(policy.due(137, ago(3601), now));
        assert!(!policy.due(1, now + chrono::Duration::seconds(60), now));
    }
}
