//! Per-job caps on stored metric points and distinct keys.
//!
//! A job writes whatever its training script logs; without a bound one job
//! can fill the service's disk (a million points take about 145 MB on
//! SQLite) or make every read of its latest values megabytes long. The
//! counts live in `metric_jobs` and move in the write transaction itself,
//! under the job's row lock, so a check costs no scan and concurrent writers
//! of one job cannot pass a cap together.
//!
//! A batch that would pass a cap is refused whole: clients retry batches,
//! and a batch that is either stored or not is one they can reason about.
//! Points already stored are not new, so an idempotent retry of a stored
//! batch is accepted even at the cap.

use crate::domain::JobId;

/// Default cap on stored points per job: a run logging 100 keys at every
/// one of 100,000 steps fits; on SQLite that is about 1.5 GB, which an
/// operator of a small disk should lower.
pub const DEFAULT_MAX_POINTS_PER_JOB: i64 = 10_000_000;
/// Default cap on distinct keys per job: far above what training scripts
/// log (tens to a few hundred, per-layer statistics included), and small
/// enough that every latest value of a job fits one GetLatestMetrics page.
pub const DEFAULT_MAX_KEYS_PER_JOB: i64 = 1_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caps {
    pub points: i64,
    pub keys: i64,
}

impl Default for Caps {
    fn default() -> Self {
        Self {
            points: DEFAULT_MAX_POINTS_PER_JOB,
            keys: DEFAULT_MAX_KEYS_PER_JOB,
        }
    }
}

/// What a job has stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub points: i64,
    pub keys: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cap {
    Points,
    Keys,
}

impl Cap {
    pub fn noun(self) -> &'static str {
        match self {
            Cap::Points => "metric points",
            Cap::Keys => "distinct metric keys",
        }
    }

    /// The flag that sets it, so the message says what an operator changes.
    pub fn flag(self) -> &'static str {
        match self {
            Cap::Points => "--max-points-per-job",
            Cap::Keys => "--max-keys-per-job",
        }
    }
}

/// A batch refused because it would take a job past a cap.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "job `{job}` may store at most {limit} {noun} (metrics-service {flag}); it has {stored} \
     and this batch adds {adding} more, so none of the batch was stored",
    noun = cap.noun(),
    flag = cap.flag()
)]
pub struct CapExceeded {
    pub job: JobId,
    pub cap: Cap,
    pub limit: i64,
    pub stored: i64,
    pub adding: i64,
}

impl Caps {
    /// Whether `adding` more on top of `stored` stays within `cap`.
    pub fn check(self, job: JobId, cap: Cap, stored: i64, adding: i64) -> Result<(), CapExceeded> {
        let limit = match cap {
            Cap::Points => self.points,
            Cap::Keys => self.keys,
        };
        if adding > 0 && stored.saturating_add(adding) > limit {
            return Err(CapExceeded {
                job,
                cap,
                limit,
                stored,
                adding,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cap_allows_up_to_and_including_its_limit() {
        let caps = Caps {
            points: 10,
            keys: 2,
        };
        let job = JobId::new();
        assert!(caps.check(job, Cap::Points, 4, 6).is_ok());
        let e = caps.check(job, Cap::Points, 4, 7).unwrap_err();
        assert_eq!((e.limit, e.stored, e.adding), (10, 4, 7));
        assert!(e.to_string().contains("--max-points-per-job"), "{e}");
        assert!(e.to_string().contains("at most 10 metric points"), "{e}");
        // Nothing new is never refused, even past a lowered cap.
        assert!(caps.check(job, Cap::Keys, 5, 0).is_ok());
        assert!(caps.check(job, Cap::Keys, i64::MAX, 1).is_err());
    }
}
