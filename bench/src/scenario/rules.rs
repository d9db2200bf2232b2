//! The diagnosis rule set over a 100 MB log, timed: every built-in rule
//! against every line, as `RuleSet::evaluate` runs it. The log is shaped
//! like a chatty distributed run — step lines, progress bars, warnings,
//! NCCL INFO lines — with a CUDA out-of-memory traceback at its end. No
//! I/O: the log is built in memory first.

use std::time::Instant;

use diagnosis_service::domain::{JobFacts, JobId, LogLine};
use diagnosis_service::rules::RuleSet;
use trainmesh_common::proto::job::v1 as jpb;

use crate::report::{Row, Target};

const NAME: &str = "diagnosis";
/// Size of the log.
const LOG_BYTES: usize = 100 * 1024 * 1024;
/// The target: the whole rule set over the log within a second.
const TARGET_SECS: f64 = 1.0;
const ROUNDS: usize = 3;

const TRACEBACK: [&str; 6] = [
    "Traceback (most recent call last):",
    "  File \"/workspace/train.py\", line 120, in main",
    "    loss.backward()",
    "  File \"/usr/local/lib/python3.10/dist-packages/torch/_tensor.py\", line 522, in backward",
    "    torch.autograd.backward(",
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.10 GiB of which 1.20 GiB is free.",
];

fn line(i: usize) -> String {
    match i % 10 {
        0 => format!(
            "{{'loss': {:.4}, 'grad_norm': {:.3}, 'learning_rate': 1.9e-05, 'epoch': {:.2}}}",
            2.0 / (1.0 + i as f64 / 1e5),
            1.0 + (i % 7) as f64 / 10.0,
            i as f64 / 1e6
        ),
        1 => format!(" 12%|█▏        | {i}/1000000 [1:02:03<7:35:11, 33.3it/s]"),
        2 => format!("node-3:4812:4950 [{}] NCCL INFO Channel 00/0 : 3[3] -> 4[4] via P2P/IPC", i % 8),
        3 => "/usr/local/lib/python3.10/dist-packages/torch/utils/checkpoint.py:464: UserWarning: torch.utils.checkpoint: the use_reentrant parameter should be passed explicitly.".into(),
        4 => format!("[2025-01-10 12:00:{:02}] INFO trainer.py:2011 >> step {i} throughput 3412 tokens/s", i % 60),
        _ => format!("step {i} loss 1.{:04} lr 1.9e-05", i % 10_000),
    }
}

/// About `LOG_BYTES` of lines, then the traceback.
fn log() -> Vec<LogLine> {
    let mut lines = Vec::new();
    let mut bytes = 0;
    let mut i = 0;
    while bytes < LOG_BYTES {
        let text = line(i);
        bytes += text.len() + 1;
        i += 1;
        lines.push(LogLine::new(i as i64, text));
    }
    for t in TRACEBACK {
        i += 1;
        lines.push(LogLine::new(i as i64, t));
    }
    lines
}

fn job() -> JobFacts {
    JobFacts {
        id: JobId::new(),
        owner: "bench".into(),
        name: "chatty".into(),
        state: jpb::JobState::Failed,
        failure_cause: jpb::FailureCause::UserCode,
        state_reason: String::new(),
        error: None,
        exit_code: Some(1),
        attempts: 1,
        gpus: 8,
        shm_mib: 16384,
        workers: 0,
        correlation_id: String::new(),
        replicas: Vec::new(),
        checks: Default::default(),
    }
}

/// The median time of `evaluate()` over the log, as a row.
pub fn measure() -> Vec<Row> {
    let rules = RuleSet::builtin();
    let log = log();
    let job = job();
    let mut times = Vec::with_capacity(ROUNDS);
    let mut category = String::new();
    for _ in 0..ROUNDS {
        let t = Instant::now();
        let findings = rules.evaluate(&job, &log);
        times.push(t.elapsed().as_secs_f64());
        category = findings
            .first()
            .map(|f| f.category.clone())
            .unwrap_or_default();
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    vec![Row::new(
        NAME,
        "none",
        format!("rules over a {} MB log (median)", LOG_BYTES >> 20),
        median,
        "s",
        Some(Target::AtMost(TARGET_SECS)),
    )
    .with_note(format!(
        "{} lines, {} rules; found {category}; {ROUNDS} rounds",
        log.len(),
        rules.ids().len()
    ))]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_ends_with_its_traceback_and_the_rules_find_it() {
        let rules = RuleSet::builtin();
        let mut log: Vec<LogLine> = (0..1000)
            .map(|i| LogLine::new(i as i64 + 1, line(i)))
            .collect();
        for t in TRACEBACK {
            log.push(LogLine::new(log.len() as i64 + 1, t));
        }
        let f = rules.evaluate(&job(), &log);
        assert_eq!(f.first().map(|f| f.category.as_str()), Some("cuda-oom"));
    }
}
