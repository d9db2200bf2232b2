//! Output of `trainctl runners`: one line per runner (state, capacity,
//! node faults), and the retry decision `explain` shows.

use std::collections::BTreeMap;

use serde_json::{json, Value};
use trainmesh_common::proto::runner::v1 as runner_pb;
use trainmesh_common::proto::scheduler::v1 as sched;

use super::{one_line, short, time, Table};
use crate::json::timestamp;

pub fn runner_state(v: i32) -> String {
    match sched::RunnerState::try_from(v) {
        Ok(sched::RunnerState::Unspecified) => String::new(),
        Ok(s) => short(s.as_str_name(), "RUNNER_STATE_").to_lowercase(),
        Err(_) => format!("STATE({v})"),
    }
}

pub fn retry_action(v: i32) -> String {
    match sched::RetryAction::try_from(v) {
        Ok(sched::RetryAction::Unspecified) => String::new(),
        Ok(a) => short(a.as_str_name(), "RETRY_ACTION_"),
        Err(_) => format!("ACTION({v})"),
    }
}

/// "2 × NVIDIA H100, 1 × A10" (GPUs grouped by model); "-" for none.
pub fn gpus(cap: Option<&runner_pb::Capacity>) -> String {
    let mut by_model: BTreeMap<&str, usize> = BTreeMap::new();
    for g in cap.map(|c| c.gpus.as_slice()).unwrap_or_default() {
        let model = if g.model.is_empty() { "GPU" } else { &g.model };
        *by_model.entry(model).or_default() += 1;
    }
    if by_model.is_empty() {
        return "-".into();
    }
    by_model
        .into_iter()
        .map(|(m, n)| format!("{n} × {m}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn health_note(r: &sched::RunnerInfo) -> String {
    if !r.cordon_reason.is_empty() {
        return r.cordon_reason.clone();
    }
    if r.suspect {
        return format!("suspect: {}", r.last_fault);
    }
    String::new()
}

pub fn runners_table(runners: &[sched::RunnerInfo]) -> String {
    let mut t = Table::new([
        "NAME", "STATE", "BACKEND", "GPUS", "CPU", "MEMORY", "ACTIVE", "FAULTS", "NOTE",
    ]);
    for r in runners {
        let cap = r.capacity.as_ref();
        t.row([
            r.name.clone(),
            runner_state(r.state),
            r.backend.clone(),
            gpus(cap),
            cap.map(|c| c.cpu.to_string()).unwrap_or_default(),
            cap.map(|c| format!("{} MiB", c.memory_mib))
                .unwrap_or_default(),
            r.active_attempts.to_string(),
            r.node_faults.to_string(),
            one_line(&health_note(r)),
        ]);
    }
    t.render()
}

/// After `runners uncordon`.
pub fn uncordoned(resp: &sched::UncordonRunnerResponse) -> String {
    let name = resp.runner.as_ref().map_or("", |r| r.name.as_str());
    if resp.was_cordoned {
        format!("runner `{name}` uncordoned: it takes new work again, its node faults forgotten")
    } else {
        format!("runner `{name}` was not cordoned; its node faults are forgotten")
    }
}

pub fn runner_json(r: &sched::RunnerInfo) -> Value {
    let cap = r.capacity.as_ref();
    json!({
        "name": r.name,
        "runner_id": r.runner_id,
        "state": runner_state(r.state),
        "backend": r.backend,
        "gpus": cap.map(|c| c.gpus.iter().map(|g| json!({
            "index": g.index,
            "uuid": g.uuid,
            "model": g.model,
            "memory_mib": g.memory_mib,
        })).collect::<Vec<_>>()).unwrap_or_default(),
        "cpu": cap.map(|c| c.cpu),
        "memory_mib": cap.map(|c| c.memory_mib),
        "active_attempts": r.active_attempts,
        "node_faults": r.node_faults,
        "suspect": r.suspect,
        "last_fault": r.last_fault,
        "last_fault_time": timestamp(r.last_fault_time.as_ref()),
        "cordon_reason": r.cordon_reason,
        "cordon_time": timestamp(r.cordon_time.as_ref()),
        "register_time": timestamp(r.register_time.as_ref()),
        "last_heartbeat_time": timestamp(r.last_heartbeat_time.as_ref()),
    })
}

pub fn retry_json(d: &sched::RetryDecision) -> Value {
    json!({
        "attempt": d.attempt,
        "action": retry_action(d.action),
        "reason": d.reason,
        "time": timestamp(d.decide_time.as_ref()),
        "runner": d.runner_name,
        "category": d.category,
        "memory_mib": d.memory_mib,
    })
}

/// "attempt 1 on `runner-a` (oom-killed): MORE_MEMORY — retrying with …".
pub fn retry_line(d: &sched::RetryDecision) -> String {
    let category = if d.category.is_empty() {
        String::new()
    } else {
        format!(" ({})", d.category)
    };
    let when = time(d.decide_time.as_ref());
    let when = if when.is_empty() {
        String::new()
    } else {
        format!(" at {when}")
    };
    format!(
        "attempt {} on `{}`{category}{when}: {}: {}",
        d.attempt,
        d.runner_name,
        retry_action(d.action),
        one_line(&d.reason)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cordoned() -> sched::RunnerInfo {
        sched::RunnerInfo {
            name: "gpu-node-7".into(),
            state: sched::RunnerState::Cordoned as i32,
            backend: "process".into(),
            capacity: Some(runner_pb::Capacity {
                gpus: (0..2)
                    .map(|index| runner_pb::Gpu {
                        index,
                        model: "NVIDIA H100".into(),
                        ..Default::default()
                    })
                    .collect(),
                cpu: 32.0,
                memory_mib: 262_144,
            }),
            node_faults: 3,
            suspect: true,
            cordon_reason: "cordoned after 3 node faults".into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_table_shows_state_capacity_and_why_a_runner_is_cordoned() {
        let out = runners_table(&[cordoned()]);
        let line = out.lines().nth(1).unwrap();
        assert!(line.starts_with("gpu-node-7"), "{out}");
        assert!(line.contains("cordoned"), "{out}");
        assert!(line.contains("2 × NVIDIA H100"), "{out}");
        assert!(line.contains("262144 MiB"), "{out}");
        assert!(line.contains("cordoned after 3 node faults"), "{out}");
        assert_eq!(runner_json(&cordoned())["state"], "cordoned");
        assert_eq!(gpus(None), "-");
    }

    #[test]
    fn a_retry_decision_reads_as_one_line() {
        let d = sched::RetryDecision {
            attempt: 1,
            action: sched::RetryAction::MoreMemory as i32,
            reason: "retrying with memory 3072 MiB (1.5 × 2048 MiB)".into(),
            runner_name: "runner-a".into(),
            category: "oom-killed".into(),
            memory_mib: 3072,
            ..Default::default()
        };
        assert_eq!(
            retry_line(&d),
            "attempt 1 on `runner-a` (oom-killed): MORE_MEMORY: retrying with memory 3072 MiB \
             (1.5 × 2048 MiB)"
        );
        assert_eq!(retry_json(&d)["memory_mib"], 3072);
    }
}
