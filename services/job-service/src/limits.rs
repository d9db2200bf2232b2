//! The queued-jobs limit at submit (ISSUE 3 "Limits"): the scheduler owns
//! the limits; job-service asks it with `SchedulerService.GetLimits{user,
//! org}` (service token) and counts its own not-yet-dispatched jobs in the
//! transaction that inserts the new one.
//!
//! Answers are cached per (user, org) for a short time. When the scheduler
//! cannot be asked, the last answer is used however old it is; with no
//! answer ever, there is no queued limit (submission must not depend on the
//! scheduler being up: the outbox hands the job over later).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use trainmesh_common::client::Channel;
use trainmesh_common::proto::scheduler::v1 as spb;

/// The `effective` entry of GetLimits that caps a user's queued jobs.
pub const MAX_QUEUED_JOBS: &str = "max_queued_jobs";

/// One ceiling on queued (PENDING/QUEUED/AWAITING_APPROVAL) jobs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ceiling {
    pub value: i64,
    /// The scope whose limit binds ("USER_DEFAULT", "USER", "ORG", "GLOBAL").
    pub scope: &'static str,
}

/// The queued-jobs ceilings that apply to one (user, org) submission.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueuedLimits {
    /// The user's effective limit: min(user or user-default, org ceiling).
    pub user: Option<Ceiling>,
    /// The org's total over all its users.
    pub org: Option<Ceiling>,
    /// The total over everyone.
    pub global: Option<Ceiling>,
}

impl QueuedLimits {
    pub fn is_empty(&self) -> bool {
        self.user.is_none() && self.org.is_none() && self.global.is_none()
    }

    /// Extracts the queued-jobs ceilings from a GetLimits answer for
    /// (`org`): the user's from `effective`, the org's and the global one
    /// from the configured rows.
    pub fn from_response(org: &str, resp: &spb::GetLimitsResponse) -> Self {
        let row = |scope: spb::LimitScope, subject: &str| {
            resp.limits
                .iter()
                .find(|l| l.scope == scope as i32 && l.subject == subject)
                .and_then(|l| l.max_queued_jobs)
                .map(|v| Ceiling {
                    value: i64::from(v),
                    scope: scope_name(scope as i32),
                })
        };
        // When the org's or the global ceiling is what binds the user, the
        // org's or everyone's total (checked below against that same row)
        // reaches it no later than the user's own count does: that check
        // refuses, and names the scope that really binds.
        let user = resp
            .effective
            .iter()
            .find(|e| e.name == MAX_QUEUED_JOBS)
            .filter(|e| {
                let row_scope = match spb::LimitScope::try_from(e.binding_scope) {
                    Ok(spb::LimitScope::Org) => Some((spb::LimitScope::Org, org)),
                    Ok(spb::LimitScope::Global) => Some((spb::LimitScope::Global, "")),
                    _ => None,
                };
                row_scope.is_none_or(|(scope, subject)| row(scope, subject).is_none())
            })
            .map(|e| Ceiling {
                value: e.value,
                scope: scope_name(e.binding_scope),
            });
        Self {
            user,
            org: (!org.is_empty())
                .then(|| row(spb::LimitScope::Org, org))
                .flatten(),
            global: row(spb::LimitScope::Global, ""),
        }
    }
}

/// `LIMIT_SCOPE_USER_DEFAULT` → `USER_DEFAULT`, as users see it in errors.
pub fn scope_name(scope: i32) -> &'static str {
    match spb::LimitScope::try_from(scope) {
        Ok(spb::LimitScope::Global) => "GLOBAL",
        Ok(spb::LimitScope::Org) => "ORG",
        Ok(spb::LimitScope::User) => "USER",
        Ok(spb::LimitScope::UserDefault) => "USER_DEFAULT",
        Ok(spb::LimitScope::Unspecified) | Err(_) => "an unnamed scope",
    }
}

/// Where the limits come from.
#[tonic::async_trait]
pub trait LimitsSource: Send + Sync + 'static {
    async fn fetch(&self, user: &str, org: &str) -> Result<QueuedLimits, String>;
}

/// The scheduler over gRPC (the channel carries the service token).
pub struct SchedulerLimits {
    pub channel: Channel,
    pub timeout: Duration,
}

#[tonic::async_trait]
impl LimitsSource for SchedulerLimits {
    async fn fetch(&self, user: &str, org: &str) -> Result<QueuedLimits, String> {
        let mut client =
            spb::scheduler_service_client::SchedulerServiceClient::new(self.channel.clone());
        let call = client.get_limits(spb::GetLimitsRequest {
            user: user.to_owned(),
            org: org.to_owned(),
        });
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(resp)) => Ok(QueuedLimits::from_response(org, resp.get_ref())),
            Ok(Err(status)) => Err(format!("{:?}: {}", status.code(), status.message())),
            Err(_) => Err(format!("no answer within {:?}", self.timeout)),
        }
    }
}

#[derive(Default)]
struct Slot {
    /// The last answer, and when it was asked for (successfully or not).
    known: Option<QueuedLimits>,
    asked: Option<Instant>,
}

/// GetLimits answers per (user, org), refreshed at most once per `ttl`.
/// Concurrent submissions of one user wait for one refresh instead of each
/// asking the scheduler.
pub struct LimitsCache {
    source: Box<dyn LimitsSource>,
    ttl: Duration,
    slots: Mutex<HashMap<(String, String), SharedSlot>>,
}

type SharedSlot = Arc<tokio::sync::Mutex<Slot>>;

impl LimitsCache {
    pub fn new(source: impl LimitsSource, ttl: Duration) -> Self {
        Self {
            source: Box::new(source),
            ttl,
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// The limits for a submission by `user` of `org`.
    pub async fn get(&self, user: &str, org: &str) -> QueuedLimits {
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            slots
                .entry((user.to_owned(), org.to_owned()))
                .or_default()
                .clone()
        };
        let mut slot = slot.lock().await;
        let fresh = slot.asked.is_some_and(|t| t.elapsed() < self.ttl);
        if !fresh {
            // A failed attempt also counts as asked: an unreachable
            // scheduler is tried once per ttl, not on every submission.
            slot.asked = Some(Instant::now());
            match self.source.fetch(user, org).await {
                Ok(limits) => slot.known = Some(limits),
                Err(e) => tracing::warn!(
                    user, org, error = %e,
                    using_last_known = slot.known.is_some(),
                    "cannot get limits from the scheduler"
                ),
            }
        }
        slot.known.clone().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn response() -> spb::GetLimitsResponse {
        spb::GetLimitsResponse {
            limits: vec![
                spb::Limits {
                    scope: spb::LimitScope::Org as i32,
                    subject: "ml".into(),
                    max_queued_jobs: Some(50),
                    ..Default::default()
                },
                spb::Limits {
                    scope: spb::LimitScope::Org as i32,
                    subject: "ops".into(),
                    max_queued_jobs: Some(7),
                    ..Default::default()
                },
                spb::Limits {
                    scope: spb::LimitScope::Global as i32,
                    max_running_jobs: Some(3),
                    ..Default::default()
                },
            ],
            effective: vec![
                spb::EffectiveLimit {
                    name: "max_running_jobs".into(),
                    value: 2,
                    binding_scope: spb::LimitScope::UserDefault as i32,
                },
                spb::EffectiveLimit {
                    name: MAX_QUEUED_JOBS.into(),
                    value: 10,
                    binding_scope: spb::LimitScope::UserDefault as i32,
                },
            ],
        }
    }

    #[test]
    fn ceilings_come_from_effective_and_the_org_and_global_rows() {
        let l = QueuedLimits::from_response("ml", &response());
        assert_eq!(
            l.user,
            Some(Ceiling {
                value: 10,
                scope: "USER_DEFAULT"
            })
        );
        assert_eq!(
            l.org,
            Some(Ceiling {
                value: 50,
                scope: "ORG"
            })
        );
        // The global row has no queued limit.
        assert_eq!(l.global, None);
        assert_eq!(QueuedLimits::from_response("", &response()).org, None);
        assert!(QueuedLimits::from_response("x", &Default::default()).is_empty());
        // Bound by the org's ceiling: the org's total is what is checked.
        let mut r = response();
        r.effective[1] = spb::EffectiveLimit {
            name: MAX_QUEUED_JOBS.into(),
            value: 50,
            binding_scope: spb::LimitScope::Org as i32,
        };
        let l = QueuedLimits::from_response("ml", &r);
        assert_eq!((l.user, l.org.unwrap().value), (None, 50));
    }

    struct Counting {
        calls: Arc<AtomicUsize>,
        fail_after: usize,
    }

    #[tonic::async_trait]
    impl LimitsSource for Counting {
        async fn fetch(&self, _: &str, org: &str) -> Result<QueuedLimits, String> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            if n >= self.fail_after {
                return Err("scheduler down".into());
            }
            Ok(QueuedLimits::from_response(org, &response()))
        }
    }

    #[tokio::test]
    async fn answers_are_cached_within_the_ttl() {
        let calls = Arc::new(AtomicUsize::new(0));
        let cache = LimitsCache::new(
            Counting {
                calls: calls.clone(),
                fail_after: usize::MAX,
            },
            Duration::from_secs(3600),
        );
        let first = cache.get("alice", "ml").await;
        assert_eq!(first.user.unwrap().value, 10);
        let all = futures::future::join_all((0..8).map(|_| cache.get("alice", "ml"))).await;
        assert!(all.iter().all(|l| *l == first));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        cache.get("bob", "ml").await;
        assert_eq!(calls.load(Ordering::SeqCst), 2, "one entry per user");
    }

    #[tokio::test]
    async fn the_last_answer_outlives_the_scheduler_and_none_means_no_limit() {
        let calls = Arc::new(AtomicUsize::new(0));
        // A zero ttl asks every time.
        let cache = LimitsCache::new(
            Counting {
                calls: calls.clone(),
                fail_after: 1,
            },
            Duration::ZERO,
        );
        let first = cache.get("alice", "ml").await;
        assert!(!first.is_empty());
        assert_eq!(cache.get("alice", "ml").await, first, "last known answer");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert!(cache.get("bob", "ml").await.is_empty());
    }
}
