//! The decision after a job's latest failed attempt, kept with its queue
//! entry (as JSON) so that ExplainJob can say what was decided and why
//! after the job moved on.

use serde::{Deserialize, Serialize};
use trainmesh_common::proto::scheduler::v1 as pb;
use trainmesh_common::time::to_timestamp;

use crate::error::{Error, Result};
use crate::retry::{Change, Decision};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Retry,
    MoreMemory,
    OtherRunner,
    Fail,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub attempt: i64,
    pub action: Action,
    pub reason: String,
    /// Microseconds since the epoch.
    pub time: i64,
    pub runner: String,
    pub category: String,
    /// MiB per replica of the next attempt, when raised.
    #[serde(default)]
    pub memory_mib: i64,
}

impl Record {
    pub fn of(
        decision: &Decision,
        attempt: i64,
        reason: &str,
        runner: &str,
        category: &str,
        now: i64,
    ) -> Self {
        let (action, memory_mib) = match decision {
            Decision::Final { .. } => (Action::Fail, 0),
            Decision::Retry { change, .. } => match change {
                Change::Same => (Action::Retry, 0),
                Change::Memory { mib } => (Action::MoreMemory, *mib),
                Change::AvoidRunner { .. } => (Action::OtherRunner, 0),
            },
        };
        Record {
            attempt,
            action,
            reason: reason.to_owned(),
            time: now,
            runner: runner.to_owned(),
            category: category.to_owned(),
            memory_mib,
        }
    }

    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string(self).map_err(|e| Error::Corrupt(format!("retry decision: {e}")))
    }

    /// `None` for the empty string (no attempt failed yet).
    pub fn from_json(s: &str) -> Result<Option<Self>> {
        if s.is_empty() {
            return Ok(None);
        }
        serde_json::from_str(s)
            .map(Some)
            .map_err(|e| Error::Corrupt(format!("retry decision `{s}`: {e}")))
    }

    pub fn proto(&self) -> pb::RetryDecision {
        pb::RetryDecision {
            attempt: i32::try_from(self.attempt).unwrap_or(i32::MAX),
            action: match self.action {
                Action::Retry => pb::RetryAction::Retry,
                Action::MoreMemory => pb::RetryAction::MoreMemory,
                Action::OtherRunner => pb::RetryAction::OtherRunner,
                Action::Fail => pb::RetryAction::Fail,
            } as i32,
            reason: self.reason.clone(),
            decide_time: Some(to_timestamp(self.time)),
            runner_name: self.runner.clone(),
            category: self.category.clone(),
            memory_mib: self.memory_mib,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_survives_its_json_and_names_the_action() {
        let d = Decision::Retry {
            backoff: std::time::Duration::ZERO,
            reason: "r".into(),
            change: Change::Memory { mib: 3072 },
        };
        let r = Record::of(
            &d,
            1,
            "retrying with memory 3072 MiB",
            "runner-a",
            "oom-killed",
            5,
        );
        let back = Record::from_json(&r.to_json().unwrap()).unwrap().unwrap();
        assert_eq!(back, r);
        assert_eq!(back.proto().action, pb::RetryAction::MoreMemory as i32);
        assert_eq!(back.proto().memory_mib, 3072);
        assert_eq!(Record::from_json("").unwrap(), None);
        assert!(Record::from_json("{").is_err());
    }
}
