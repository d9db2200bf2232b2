//! Turns findings into the answer a person reads: `Healthy`, a one-line
//! `Error`, `Analysis` and `Solution`, and the evidence they cite.

use std::collections::HashSet;

use trainmesh_common::proto::job::v1 as jpb;

use crate::domain::{Evidence, Finding, JobFacts, Severity, Source};
use crate::text::{one_line, truncate};

/// Longest `Error` line, in characters.
const MAX_ERROR_CHARS: usize = 300;
/// Longest log line quoted in the analysis, in characters.
const MAX_QUOTE_CHARS: usize = 160;

#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    pub healthy: bool,
    pub error: String,
    pub analysis: String,
    pub solution: String,
    /// "Healthy: Yes|No\nError: …\nAnalysis: …\nSolution: …"
    pub text: String,
    pub evidence: Vec<Evidence>,
    pub findings: Vec<Finding>,
    pub category: String,
}

/// `log_lines`: how many lines were read; `log_note`: why the log could not
/// be read, when it could not.
pub fn compose(
    job: &JobFacts,
    log_lines: usize,
    log_note: Option<&str>,
    findings: Vec<Finding>,
) -> Report {
    let primary = findings.iter().find(|f| f.severity == Severity::Error);
    let healthy = job.state == jpb::JobState::Succeeded || (job.in_progress() && primary.is_none());
    let headline = job.error.as_ref().map(|e| e.headline()).unwrap_or_default();

    let error = if healthy {
        "None".to_owned()
    } else if let Some(f) = primary {
        let detail = if !headline.is_empty() && !f.summary.contains(&headline) {
            headline.clone()
        } else {
            f.evidence
                .iter()
                .find(|e| e.source == Source::Log)
                .map(|e| e.text.trim().to_owned())
                .unwrap_or_default()
        };
        if detail.is_empty() {
            f.summary.clone()
        } else {
            format!("{} ({})", f.summary, detail)
        }
    } else if !headline.is_empty() {
        headline.clone()
    } else if !job.state_reason.is_empty() {
        format!("job is {}: {}", job.state_name(), job.state_reason)
    } else {
        format!("job is {}", job.state_name())
    };
    let error = truncate(&one_line(&error), MAX_ERROR_CHARS);

    let mut analysis = format!("Job `{}`", job.id);
    if !job.name.is_empty() {
        analysis.push_str(&format!(" ({})", job.name));
    }
    analysis.push_str(&format!(" is {}", job.state_name()));
    if job.attempts > 1 {
        analysis.push_str(&format!(" after {} attempts", job.attempts));
    }
    if let Some(code) = job.exit_code {
        analysis.push_str(&format!(", exit code {code}"));
    }
    analysis.push('.');
    if findings.is_empty() {
        if healthy {
            analysis.push_str(&format!(
                " No known problem in the job's state, error or last {log_lines} log lines."
            ));
        } else {
            analysis.push_str(" No rule matched the job's state, error or log.");
        }
    }
    for f in &findings {
        let label = match f.severity {
            Severity::Error => "",
            Severity::Warning => "warning: ",
        };
        analysis.push_str(&format!(" [{}] {label}{}", f.rule_id, f.summary));
        if let Some(e) = f.evidence.iter().find(|e| e.source == Source::Log) {
            analysis.push_str(&format!(
                " (log line {}: {})",
                e.line_number,
                truncate(e.text.trim().trim_end_matches('.'), MAX_QUOTE_CHARS)
            ));
        }
        analysis.push('.');
    }
    if let Some(note) = log_note {
        analysis.push_str(&format!(" The log could not be read: {note}."));
    }
    let analysis = one_line(&analysis);

    let warnings: Vec<&str> = findings
        .iter()
        .filter(|f| f.severity == Severity::Warning)
        .map(|f| f.hint.as_str())
        .collect();
    let mut solution = match (healthy, primary) {
        (_, Some(f)) => f.hint.clone(),
        (true, None) if warnings.is_empty() => "None".to_owned(),
        (true, None) => String::new(),
        (false, None) => match job.error.as_ref().filter(|e| !e.hint.is_empty()) {
            Some(e) => e.hint.clone(),
            None => "Read the job's log and state reason (trainctl logs / trainctl get).".into(),
        },
    };
    for w in warnings {
        if solution.is_empty() {
            solution = format!("Consider: {w}");
        } else {
            solution.push_str(&format!(" Also: {w}"));
        }
    }
    let solution = one_line(&solution);

    let mut evidence = Vec::new();
    let mut seen = HashSet::new();
    for e in findings.iter().flat_map(|f| &f.evidence) {
        if seen.insert(e.clone()) {
            evidence.push(e.clone());
        }
    }
    if !headline.is_empty() && !evidence.iter().any(|e| e.text == headline) {
        evidence.push(Evidence::error(headline));
    }

    let text = format!(
        "Healthy: {}\nError: {error}\nAnalysis: {analysis}\nSolution: {solution}",
        if healthy { "Yes" } else { "No" }
    );
    let category = findings
        .first()
        .map(|f| f.category.clone())
        .unwrap_or_default();
    Report {
        healthy,
        error,
        analysis,
        solution,
        text,
        evidence,
        findings,
        category,
    }
}
