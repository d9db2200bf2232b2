//! Human output: aligned tables and short enum names. Every function here
//! returns a `String` so it can be tested without a terminal.

use std::fmt::Write as _;

use trainmesh_common::proto::job::v1 as pb;
use trainmesh_common::proto::metrics::v1 as metrics;
use trainmesh_common::proto::scheduler::v1 as sched;

mod admin;
mod diagnosis;
mod runners;
mod scheduling;
pub use admin::*;
pub use diagnosis::*;
pub use runners::*;
pub use scheduling::*;

/// How many lines of a job's `error_message` `get` shows.
const ERROR_LINES: usize = 12;

/// Columns padded to their widest cell, two spaces apart.
#[derive(Debug, Default)]
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new<S: Into<String>>(headers: impl IntoIterator<Item = S>) -> Self {
        let mut t = Self::default();
        t.rows.push(headers.into_iter().map(Into::into).collect());
        t
    }

    pub fn row<S: Into<String>>(&mut self, cells: impl IntoIterator<Item = S>) {
        self.rows
            .push(cells.into_iter().map(|c| one_line(&c.into())).collect());
    }

    pub fn render(&self) -> String {
        let cols = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut widths = vec![0; cols];
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in &self.rows {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                line.push_str(cell);
                if i + 1 < row.len() {
                    let pad = widths[i] - cell.chars().count();
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Control characters would break the alignment (and a terminal).
fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// `JOB_STATE_RUNNING` → `RUNNING`: the part after the enum's prefix.
fn short(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix).unwrap_or(name).to_owned()
}

pub fn state(v: i32) -> String {
    match pb::JobState::try_from(v) {
        Ok(s) => short(s.as_str_name(), "JOB_STATE_"),
        Err(_) => format!("STATE({v})"),
    }
}

pub fn failure_cause(v: i32) -> String {
    match pb::FailureCause::try_from(v) {
        Ok(pb::FailureCause::Unspecified) => String::new(),
        Ok(c) => short(c.as_str_name(), "FAILURE_CAUSE_"),
        Err(_) => format!("CAUSE({v})"),
    }
}

fn attempt_state(v: i32) -> String {
    match pb::AttemptState::try_from(v) {
        Ok(s) => short(s.as_str_name(), "ATTEMPT_STATE_"),
        Err(_) => format!("STATE({v})"),
    }
}

fn pending_reason(v: i32) -> String {
    match sched::PendingReason::try_from(v) {
        Ok(sched::PendingReason::Unspecified) => String::new(),
        Ok(r) => short(r.as_str_name(), "PENDING_REASON_"),
        Err(_) => format!("REASON({v})"),
    }
}

/// Parses a state as a user types it: `running`, `RUNNING` or
/// `JOB_STATE_RUNNING`.
pub fn parse_state(text: &str) -> Result<pb::JobState, String> {
    let upper = text.trim().to_ascii_uppercase().replace('-', "_");
    let full = if upper.starts_with("JOB_STATE_") {
        upper
    } else {
        format!("JOB_STATE_{upper}")
    };
    match pb::JobState::from_str_name(&full) {
        Some(s) if s != pb::JobState::Unspecified => Ok(s),
        _ => Err(format!(
            "unknown state `{text}`; expected one of pending, queued, awaiting_approval, \
             scheduled, running, succeeded, failed, cancelled"
        )),
    }
}

pub fn is_terminal(state: i32) -> bool {
    matches!(
        pb::JobState::try_from(state),
        Ok(pb::JobState::Succeeded | pb::JobState::Failed | pb::JobState::Cancelled)
    )
}

/// UTC, to the second: `2024-05-01 12:00:03Z`; empty when unset.
pub fn time(ts: Option<&prost_types::Timestamp>) -> String {
    ts.and_then(|t| chrono::DateTime::<chrono::Utc>::from_timestamp(t.seconds, 0))
        .map(|dt| dt.format("%Y-%m-%d %H:%M:%SZ").to_string())
        .unwrap_or_default()
}

/// `42s`, `5m`, `3h`, `2d` since `ts`, measured at `now_secs`.
pub fn age(ts: Option<&prost_types::Timestamp>, now_secs: i64) -> String {
    let Some(ts) = ts else {
        return String::new();
    };
    let secs = (now_secs - ts.seconds).max(0);
    human_secs(secs)
}

fn human_secs(secs: i64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 2 * 3600 => format!("{}m", s / 60),
        s if s < 2 * 86400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

fn wait(d: Option<&prost_types::Duration>) -> String {
    d.map(|d| human_secs(d.seconds)).unwrap_or_default()
}

/// A metric value in at most ~7 significant digits; NaN and ±Inf spelled
/// out.
pub fn value(v: f64) -> String {
    if v.is_nan() {
        return "NaN".into();
    }
    if v.is_infinite() {
        return if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        };
    }
    if v == v.trunc() && v.abs() < 1e15 {
        return format!("{v:.0}");
    }
    let a = v.abs();
    if (1e-4..1e7).contains(&a) {
        let s = format!("{v:.6}");
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        format!("{v:.4e}")
    }
}

pub fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

fn exit_code(job: &pb::Job) -> Option<i32> {
    job.attempts
        .iter()
        .rev()
        .find_map(|a| a.exit_code)
        .or_else(|| job.error.as_ref().map(|e| e.exit_code))
}

pub fn job_list(jobs: &[pb::Job], now_secs: i64) -> String {
    let mut t = Table::new(["ID", "NAME", "OWNER", "STATE", "AGE", "ATTEMPTS", "ERROR"]);
    for j in jobs {
        let name = j.spec.as_ref().map(|s| s.name.as_str()).unwrap_or("");
        t.row([
            j.id.clone(),
            name.to_owned(),
            j.owner.clone(),
            state(j.state),
            age(j.create_time.as_ref(), now_secs),
            j.attempts.len().to_string(),
            first_line(&j.error_message).to_owned(),
        ]);
    }
    t.render()
}

pub fn job_detail(j: &pb::Job) -> String {
    let spec = j.spec.clone().unwrap_or_default();
    let mut state_text = state(j.state);
    if j.cancel_requested && !is_terminal(j.state) {
        state_text.push_str(" (cancel requested)");
    }
    let owner = if j.org.is_empty() {
        j.owner.clone()
    } else {
        format!("{} (org {})", j.owner, j.org)
    };
    let mut fields: Vec<(&str, String)> = vec![
        ("ID", j.id.clone()),
        ("Name", spec.name.clone()),
        ("Owner", owner),
        ("State", state_text),
        ("Reason", j.state_reason.clone()),
        ("Attempts", j.attempts.len().to_string()),
        ("Created", time(j.create_time.as_ref())),
        ("Started", time(j.start_time.as_ref())),
        ("Ended", time(j.end_time.as_ref())),
        (
            "Exit code",
            exit_code(j).map(|c| c.to_string()).unwrap_or_default(),
        ),
        ("Failure cause", failure_cause(j.failure_cause)),
        ("Command", spec.command.join(" ")),
        ("Correlation id", j.correlation_id.clone()),
    ];
    if !j.pipeline_id.is_empty() {
        fields.push((
            "Pipeline",
            format!("{} / {}", j.pipeline_id, j.pipeline_stage),
        ));
    }
    if let Some(d) = &j.diagnosis {
        let mut text = format!("healthy: {}", if d.healthy { "yes" } else { "no" });
        if !d.error.is_empty() {
            let _ = write!(text, "; error: {}", first_line(&d.error));
        }
        if !d.solution.is_empty() {
            let _ = write!(text, "; solution: {}", first_line(&d.solution));
        }
        fields.push(("Diagnosis", text));
    }
    let mut t = Table::default();
    for (k, v) in fields.into_iter().filter(|(_, v)| !v.is_empty()) {
        t.row([format!("{k}:"), v]);
    }
    let mut out = t.render();
    if !j.error_message.is_empty() {
        out.push_str("Error:\n");
        let lines: Vec<&str> = j.error_message.lines().collect();
        for l in lines.iter().take(ERROR_LINES) {
            let _ = writeln!(out, "  {l}");
        }
        if lines.len() > ERROR_LINES {
            let _ = writeln!(
                out,
                "  … {} more lines (`trainctl get {} -o json` shows all)",
                lines.len() - ERROR_LINES,
                j.id
            );
        }
    }
    if let Some(h) = j.error.as_ref().map(|e| e.hint.as_str()) {
        if !h.is_empty() {
            let _ = writeln!(out, "Hint: {h}");
        }
    }
    if !j.attempts.is_empty() {
        out.push_str("Attempts:\n");
        let mut t = Table::new(["  #", "RUNNER", "STATE", "STARTED", "ENDED", "EXIT"]);
        for a in &j.attempts {
            t.row([
                format!("  {}", a.number),
                a.runner_id.clone(),
                attempt_state(a.state),
                time(a.start_time.as_ref()),
                time(a.end_time.as_ref()),
                a.exit_code.map(|c| c.to_string()).unwrap_or_default(),
            ]);
        }
        out.push_str(&t.render());
    }
    out
}

/// One event per line, for `watch` and `submit --wait`.
pub fn event_line(e: &pb::JobEvent) -> String {
    let mut line = time(e.time.as_ref());
    if !line.is_empty() {
        line.push_str("  ");
    }
    let _ = write!(line, "{}  #{}  {}", e.job_id, e.sequence, e.r#type);
    if e.state != 0 {
        if e.previous_state != 0 && e.previous_state != e.state {
            let _ = write!(line, "  {} -> {}", state(e.previous_state), state(e.state));
        } else {
            let _ = write!(line, "  {}", state(e.state));
        }
    }
    if e.attempt > 0 {
        let _ = write!(line, "  attempt {}", e.attempt);
    }
    if !e.message.is_empty() {
        let _ = write!(line, "  {}", one_line(first_line(&e.message)));
    }
    line
}

pub fn metrics_table(points: &[metrics::MetricPoint]) -> String {
    let mut t = Table::new(["KEY", "STEP", "VALUE", "TIME"]);
    for p in points {
        t.row([
            p.key.clone(),
            p.step.to_string(),
            value(p.value),
            time(p.time.as_ref()),
        ]);
    }
    t.render()
}

pub fn queue_table(entries: &[sched::QueueEntry], now_secs: i64) -> String {
    let mut t = Table::new([
        "POS", "JOB", "OWNER", "PRIORITY", "STATE", "GPUS", "AGE", "WAIT", "REASON",
    ]);
    for q in entries {
        let mut reason = pending_reason(q.reason);
        if !q.reason_detail.is_empty() {
            if reason.is_empty() {
                reason = q.reason_detail.clone();
            } else {
                let _ = write!(reason, ": {}", q.reason_detail);
            }
        }
        t.row([
            if q.position > 0 {
                q.position.to_string()
            } else {
                String::new()
            },
            q.job_id.clone(),
            q.owner.clone(),
            q.priority.to_string(),
            state(q.state),
            q.gpus.to_string(),
            age(q.submit_time.as_ref(), now_secs),
            wait(q.estimated_wait.as_ref()),
            reason,
        ]);
    }
    t.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(seconds: i64) -> Option<prost_types::Timestamp> {
        Some(prost_types::Timestamp { seconds, nanos: 0 })
    }

    #[test]
    fn table_aligns_columns_and_trims_the_last() {
        let mut t = Table::new(["ID", "NAME", "STATE"]);
        t.row(["1", "a-long-name", "RUNNING"]);
        t.row(["22", "b", ""]);
        assert_eq!(
            t.render(),
            "ID  NAME         STATE\n1   a-long-name  RUNNING\n22  b\n"
        );
    }

    #[test]
    fn table_cells_cannot_break_lines() {
        let mut t = Table::new(["A", "B"]);
        t.row(["x\ny", "z\tw"]);
        assert_eq!(t.render(), "A    B\nx y  z w\n");
    }

    #[test]
    fn states_are_parsed_in_any_spelling() {
        assert_eq!(parse_state("running").unwrap(), pb::JobState::Running);
        assert_eq!(parse_state("FAILED").unwrap(), pb::JobState::Failed);
        assert_eq!(
            parse_state("awaiting-approval").unwrap(),
            pb::JobState::AwaitingApproval
        );
        assert_eq!(
            parse_state("JOB_STATE_QUEUED").unwrap(),
            pb::JobState::Queued
        );
        assert!(parse_state("unspecified").is_err());
        assert!(parse_state("done").unwrap_err().contains("`done`"));
    }

    #[test]
    fn ages_are_short() {
        let now = 1_000_000;
        assert_eq!(age(ts(now - 5).as_ref(), now), "5s");
        assert_eq!(age(ts(now - 600).as_ref(), now), "10m");
        assert_eq!(age(ts(now - 3 * 3600).as_ref(), now), "3h");
        assert_eq!(age(ts(now - 3 * 86400).as_ref(), now), "3d");
        assert_eq!(age(ts(now + 10).as_ref(), now), "0s");
        assert_eq!(age(None, now), "");
    }

    #[test]
    fn metric_values_are_compact() {
        assert_eq!(value(20.0), "20");
        assert_eq!(value(0.5), "0.5");
        assert_eq!(value(0.123456789), "0.123457");
        assert_eq!(value(1.5e-7), "1.5000e-7");
        assert_eq!(value(f64::NAN), "NaN");
        assert_eq!(value(f64::NEG_INFINITY), "-Inf");
    }

    fn failed_job() -> pb::Job {
        let traceback: String = (1..=20).map(|i| format!("  frame {i}\n")).collect();
        pb::Job {
            id: "job-1".into(),
            owner: "alice".into(),
            org: "ml".into(),
            state: pb::JobState::Failed as i32,
            failure_cause: pb::FailureCause::UserCode as i32,
            error_message: format!(
                "Error Type: RuntimeError\nError Message: CUDA out of memory\nFull Traceback:\n{traceback}"
            ),
            spec: Some(pb::JobSpec {
                name: "train".into(),
                command: vec!["python3".into(), "t.py".into()],
                ..Default::default()
            }),
            attempts: vec![pb::Attempt {
                number: 1,
                runner_id: "r1".into(),
                state: pb::AttemptState::Failed as i32,
                exit_code: Some(1),
                ..Default::default()
            }],
            create_time: ts(1_700_000_000),
            diagnosis: Some(pb::DiagnosisSummary {
                healthy: false,
                error: "CUDA out of memory".into(),
                solution: "reduce the batch size".into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn list_shows_the_first_line_of_the_error() {
        let out = job_list(&[failed_job()], 1_700_000_060);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("ID     NAME   OWNER  STATE   AGE  ATTEMPTS  ERROR"));
        assert!(lines[1].contains("FAILED"));
        assert!(lines[1].contains("60s"));
        assert!(lines[1].ends_with("Error Type: RuntimeError"));
    }

    #[test]
    fn detail_shows_fields_error_head_and_diagnosis() {
        let out = job_detail(&failed_job());
        assert!(out.contains("State:"), "{out}");
        assert!(out.contains("Owner:          alice (org ml)"), "{out}");
        assert!(out.contains("Exit code:      1"), "{out}");
        assert!(out.contains("Failure cause:  USER_CODE"), "{out}");
        assert!(
            out.contains("Created:        2023-11-14 22:13:20Z"),
            "{out}"
        );
        assert!(out.contains("  Error Message: CUDA out of memory"), "{out}");
        assert!(out.contains("more lines"), "{out}");
        assert!(!out.contains("frame 20"), "{out}");
        assert!(out.contains("solution: reduce the batch size"), "{out}");
        assert!(
            !out.contains("Started:"),
            "unset fields are left out: {out}"
        );
    }

    #[test]
    fn event_lines_show_the_transition() {
        let e = pb::JobEvent {
            job_id: "j".into(),
            sequence: 3,
            r#type: "state_changed".into(),
            state: pb::JobState::Running as i32,
            previous_state: pb::JobState::Scheduled as i32,
            attempt: 1,
            time: ts(1_700_000_000),
            ..Default::default()
        };
        assert_eq!(
            event_line(&e),
            "2023-11-14 22:13:20Z  j  #3  state_changed  SCHEDULED -> RUNNING  attempt 1"
        );
    }

    #[test]
    fn queue_table_joins_reason_and_detail() {
        let q = sched::QueueEntry {
            job_id: "j".into(),
            owner: "bob".into(),
            position: 1,
            reason: sched::PendingReason::UserRunningLimit as i32,
            reason_detail: "2 of 2 running".into(),
            state: pb::JobState::Queued as i32,
            estimated_wait: Some(prost_types::Duration {
                seconds: 300,
                nanos: 0,
            }),
            ..Default::default()
        };
        let out = queue_table(&[q], 0);
        assert!(out.contains("USER_RUNNING_LIMIT: 2 of 2 running"), "{out}");
        assert!(out.contains("5m"), "{out}");
    }
}
