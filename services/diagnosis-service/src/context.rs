//! What the LLM is asked about: which replicas ([`targets`]) and, for each,
//! the template variables ([`vars`]) made from the job, the rule findings
//! and the log.
//!
//! In a Kubernetes attempt's log the master's output is unprefixed, an
//! abnormal worker's copied output is prefixed `[<pod name>] `, and the
//! backend's pod and job events are `[trainmesh] k8s: …` lines (other
//! `[trainmesh] …` lines are the runner's own notices). Each analysis gets
//! the log window of its own replica's lines and the job's events.

use trainmesh_common::proto::job::v1 as jpb;

use crate::domain::{Finding, JobFacts, LogLine, ReplicaFacts, Source};
use crate::logwindow::{self, WINDOW_LINES};
use crate::prompt::Kind;
use crate::rules::cause_name;
use crate::template::{MetaKey, Vars};
use crate::text::{one_line, truncate};

/// Abnormal workers analysed besides the master.
pub const MAX_WORKERS: usize = 5;
/// Platform events given, the most recent.
const MAX_EVENTS: usize = 40;
/// Traceback lines given, the last.
const MAX_TRACEBACK_LINES: usize = 40;
/// Longest log or event line given, in characters.
const MAX_LINE_CHARS: usize = 500;

const PLATFORM_PREFIX: &str = "[trainmesh]";

/// One analysis to make.
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    pub kind: Kind,
    /// The replica, when the backend reported it.
    pub replica: Option<ReplicaFacts>,
}

impl Target {
    /// The replica's pod name, or "".
    pub fn replica_name(&self) -> &str {
        self.replica.as_ref().map_or("", |r| r.name.as_str())
    }
}

/// A distributed job: spec workers beside the master.
fn distributed(job: &JobFacts) -> bool {
    job.workers > 0
}

/// The master and at most [`MAX_WORKERS`] abnormal workers of a
/// distributed job (healthy workers are not analysed), or the job.
pub fn targets(job: &JobFacts) -> Vec<Target> {
    if !distributed(job) {
        return vec![Target {
            kind: Kind::Job,
            replica: None,
        }];
    }
    let mut t = vec![Target {
        kind: Kind::Master,
        replica: job.replicas.iter().find(|r| r.is_master()).cloned(),
    }];
    t.extend(
        job.replicas
            .iter()
            .filter(|r| !r.is_master() && r.abnormal())
            .take(MAX_WORKERS)
            .map(|r| Target {
                kind: Kind::Worker,
                replica: Some(r.clone()),
            }),
    );
    t
}

/// "Failed", "Running", … as Aegis' job conditions read.
fn status_word(state: jpb::JobState) -> &'static str {
    match state {
        jpb::JobState::Unspecified => "Unknown",
        jpb::JobState::Pending => "Pending",
        jpb::JobState::Queued => "Queued",
        jpb::JobState::AwaitingApproval => "AwaitingApproval",
        jpb::JobState::Scheduled => "Scheduled",
        jpb::JobState::Running => "Running",
        jpb::JobState::Succeeded => "Succeeded",
        jpb::JobState::Failed => "Failed",
        jpb::JobState::Cancelled => "Cancelled",
    }
}

fn metadata(job: &JobFacts, vars: &mut Vars) {
    let name = if job.name.is_empty() {
        job.id.to_string()
    } else {
        job.name.clone()
    };
    vars.set(MetaKey::JobName, name);
    let mut status = status_word(job.state).to_owned();
    if !job.state_reason.trim().is_empty() {
        status.push_str(&format!(
            ": {}",
            truncate(&one_line(&job.state_reason), 300)
        ));
    }
    vars.set(MetaKey::JobStatus, status);

    let mut launcher = if job.attempts == 0 {
        "no attempt yet".to_owned()
    } else {
        format!("attempt {}", job.attempts)
    };
    if job.attempts > 0 {
        let cause = cause_name(job.failure_cause);
        if !job.in_progress() && !cause.is_empty() {
            launcher.push_str(&format!(", failure cause {cause}"));
        }
        match job.exit_code {
            Some(code) => launcher.push_str(&format!(", exit code {code}")),
            None if job.in_progress() => launcher.push_str(", running or about to"),
            None => launcher.push_str(", no exit code"),
        }
    }
    vars.set(MetaKey::LauncherStatus, launcher);

    let masters: Vec<&ReplicaFacts> = job.replicas.iter().filter(|r| r.is_master()).collect();
    let workers: Vec<&ReplicaFacts> = job.replicas.iter().filter(|r| !r.is_master()).collect();
    vars.set(
        MetaKey::MasterExpected,
        if distributed(job) { "1" } else { "0" },
    );
    vars.set(MetaKey::MasterCreatedCount, masters.len().to_string());
    vars.set(MetaKey::WorkerExpected, job.workers.max(0).to_string());
    vars.set(MetaKey::WorkerCreatedCount, workers.len().to_string());
    let summaries = |rs: &[&ReplicaFacts]| {
        if rs.is_empty() {
            "no replica state reported".to_owned()
        } else {
            rs.iter()
                .map(|r| r.describe())
                .collect::<Vec<_>>()
                .join("\n")
        }
    };
    vars.set(MetaKey::MasterDiagnosis, summaries(&masters));
    vars.set(MetaKey::WorkerDiagnosis, summaries(&workers));
}

fn error_info(job: &JobFacts, findings: &[Finding], target: &Target) -> String {
    let mut out = Vec::new();
    match (&target.kind, &target.replica) {
        (Kind::Job, _) => {}
        (k, Some(r)) => out.push(format!("Replica analysed: {} {}", k.as_str(), r.describe())),
        (k, None) => out.push(format!(
            "Replica analysed: the {} (no state reported)",
            k.as_str()
        )),
    }
    if let Some(e) = &job.error {
        let headline = e.headline();
        if !headline.is_empty() {
            out.push(format!("Job error: {}", truncate(&headline, 1000)));
        }
        if e.exit_code != 0 || e.signal != 0 {
            out.push(format!("Exit code: {}, signal: {}", e.exit_code, e.signal));
        }
        if !e.category.is_empty() {
            out.push(format!("Error category (from the runner): {}", e.category));
        }
        let tb: Vec<&str> = e.traceback.lines().collect();
        if !tb.is_empty() {
            out.push("Traceback (its last lines):".into());
            let start = tb.len().saturating_sub(MAX_TRACEBACK_LINES);
            out.extend(tb[start..].iter().map(|l| truncate(l, MAX_LINE_CHARS)));
        }
    }
    if !findings.is_empty() {
        out.push("Rule findings (trainmesh's rule set):".into());
        for f in findings {
            let mut line = format!("- {} [{}]: {}", f.rule_id, f.category, f.summary);
            if let Some(e) = f.evidence.iter().find(|e| e.source == Source::Log) {
                line.push_str(&format!(
                    " (log line {}: {})",
                    e.line_number,
                    truncate(e.text.trim(), 200)
                ));
            }
            if !f.hint.is_empty() {
                line.push_str(&format!(". Hint: {}", f.hint));
            }
            out.push(line);
        }
    }
    if out.is_empty() {
        "No structured error was reported and no rule matched.".into()
    } else {
        out.join("\n")
    }
}

fn is_platform(line: &LogLine) -> bool {
    line.text.starts_with(PLATFORM_PREFIX)
}

/// What follows `[name]` (and its one space) when the line has that prefix.
fn strip_pod_prefix<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    let rest = text
        .strip_prefix('[')?
        .strip_prefix(name)?
        .strip_prefix(']')?;
    Some(rest.strip_prefix(' ').unwrap_or(rest))
}

fn event_info(job: &JobFacts, log: &[LogLine]) -> String {
    let mut out = vec![format!(
        "Job state: {}{}",
        job.state_name(),
        if job.state_reason.trim().is_empty() {
            String::new()
        } else {
            format!(" ({})", truncate(&one_line(&job.state_reason), 300))
        }
    )];
    let cause = cause_name(job.failure_cause);
    if !cause.is_empty() {
        out.push(format!("Failure cause: {cause}"));
    }
    out.push(format!("Attempts: {}", job.attempts));
    let events: Vec<&LogLine> = log.iter().filter(|l| is_platform(l)).collect();
    if events.is_empty() {
        out.push("No platform events in the log.".into());
    } else {
        out.push("Platform events in the log (line: event):".into());
        let start = events.len().saturating_sub(MAX_EVENTS);
        out.extend(
            events[start..]
                .iter()
                .map(|l| format!("{}: {}", l.number, truncate(&l.text, MAX_LINE_CHARS))),
        );
    }
    out.join("\n")
}

/// The replica's own lines (prefix removed), numbered as in the log.
pub fn own_lines(job: &JobFacts, log: &[LogLine], target: &Target) -> Vec<LogLine> {
    if target.kind == Kind::Worker {
        let name = target.replica_name();
        if name.is_empty() {
            return Vec::new();
        }
        return log
            .iter()
            .filter_map(|l| strip_pod_prefix(&l.text, name).map(|t| LogLine::new(l.number, t)))
            .collect();
    }
    let others: Vec<&str> = job
        .replicas
        .iter()
        .filter(|r| !r.is_master() && !r.name.is_empty())
        .map(|r| r.name.as_str())
        .collect();
    log.iter()
        .filter(|l| !is_platform(l))
        .filter(|l| {
            !others
                .iter()
                .any(|o| strip_pod_prefix(&l.text, o).is_some())
        })
        .cloned()
        .collect()
}

fn log_info(job: &JobFacts, log: &[LogLine], target: &Target) -> String {
    let own = own_lines(job, log, target);
    if own.is_empty() {
        return "(no lines of this replica in the log)".into();
    }
    logwindow::window(&own, WINDOW_LINES)
        .iter()
        .map(|l| format!("{}: {}", l.number, truncate(&l.text, MAX_LINE_CHARS)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The template variables for one analysis.
pub fn vars(job: &JobFacts, log: &[LogLine], findings: &[Finding], target: &Target) -> Vars {
    let mut v = Vars::default();
    metadata(job, &mut v);
    v.error_info = error_info(job, findings, target);
    v.event_info = event_info(job, log);
    v.log_info = log_info(job, log, target);
    v
}

#[cfg(test)]
#[path = "context_tests.rs"]
mod tests;
