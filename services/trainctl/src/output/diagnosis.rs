//! `trainctl diagnose`: the rules' answer, its evidence and findings, then
//! each LLM analysis under its own label, so that the two are never taken
//! for one another.

use std::fmt::Write as _;

use trainmesh_common::proto::diagnosis::v1 as diag;

use super::{first_line, one_line};

/// Text from a model or a log, with control characters (terminal escapes)
/// made blanks; line breaks are kept.
fn clean(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() && c != '\n' { ' ' } else { c })
        .collect()
}

/// `Label: text` on one line, or `Label:` and the lines indented.
fn field(out: &mut String, indent: &str, label: &str, text: &str) {
    let text = clean(text.trim());
    if text.contains('\n') {
        let _ = writeln!(out, "{indent}{label}:");
        for l in text.lines() {
            let _ = writeln!(out, "{indent}  {l}");
        }
    } else {
        let _ = writeln!(out, "{indent}{label}: {text}");
    }
}

fn llm_analysis(out: &mut String, a: &diag::LlmAnalysis) {
    let who = if a.replica.is_empty() {
        a.kind.clone()
    } else {
        format!("{} {}", a.kind, one_line(&a.replica))
    };
    let mut about = format!(
        "{}, prompt {}",
        one_line(&a.model),
        one_line(&a.prompt_version)
    );
    if a.cached {
        about.push_str(", from an earlier diagnosis");
    }
    match diag::LlmStatus::try_from(a.status) {
        Ok(diag::LlmStatus::Ok) => {
            let _ = writeln!(out, "LLM analysis ({who}; {about}):");
            let healthy = if a.healthy { "Yes" } else { "No" };
            let _ = writeln!(out, "  Healthy: {healthy}");
            field(out, "  ", "Error", &a.error);
            field(out, "  ", "Analysis", &a.analysis);
            field(out, "  ", "Solution", &a.solution);
        }
        Ok(diag::LlmStatus::Pending) => {
            let _ = writeln!(
                out,
                "LLM analysis ({who}): pending: {}",
                one_line(&a.status_reason)
            );
        }
        _ => {
            let _ = writeln!(
                out,
                "LLM analysis ({who}): failed: {}",
                one_line(&a.status_reason)
            );
        }
    }
}

pub fn diagnosis(d: &diag::Diagnosis) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Healthy: {}", if d.healthy { "Yes" } else { "No" });
    let _ = writeln!(out, "Error: {}", first_line(&d.error));
    field(&mut out, "", "Analysis", &d.analysis);
    field(&mut out, "", "Solution", &d.solution);
    if !d.category.is_empty() {
        let _ = writeln!(out, "Category: {}", d.category);
    }
    if !d.evidence.is_empty() {
        out.push_str("Evidence:\n");
        for e in &d.evidence {
            let place = if e.line_number > 0 {
                format!("{}:{}", e.source, e.line_number)
            } else {
                e.source.clone()
            };
            let _ = writeln!(out, "  [{place}] {}", one_line(&e.text));
        }
    }
    if !d.findings.is_empty() {
        out.push_str("Rule findings:\n");
        for f in &d.findings {
            let _ = writeln!(out, "  {} ({}): {}", f.rule_id, f.category, f.summary);
            if !f.hint.is_empty() {
                let _ = writeln!(out, "    hint: {}", f.hint);
            }
        }
    }
    if !d.llm_analyses.is_empty() {
        out.push_str("\nThe LLM's view (beside the rules' answer above, not part of it):\n");
        for a in &d.llm_analyses {
            llm_analysis(&mut out, a);
        }
        if d.llm_analyses
            .iter()
            .any(|a| a.status == diag::LlmStatus::Pending as i32)
        {
            out.push_str(
                "Pending analyses go on: run the command again later for them (answers are reused).\n",
            );
        }
    } else if !d.llm_text.is_empty() {
        // From a diagnosis-service that sends only the combined text.
        out.push_str("LLM analysis:\n");
        for l in clean(&d.llm_text).lines() {
            let _ = writeln!(out, "  {l}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diagnosis_prints_the_four_answers_and_evidence() {
        let d = diag::Diagnosis {
            healthy: false,
            error: "CUDA out of memory".into(),
            analysis: "the batch does not fit".into(),
            solution: "lower batch_size\nor use gradient checkpointing".into(),
            evidence: vec![diag::Evidence {
                source: "log".into(),
                line_number: 42,
                text: "RuntimeError: CUDA out of memory".into(),
            }],
            ..Default::default()
        };
        let out = diagnosis(&d);
        assert!(out.starts_with("Healthy: No\nError: CUDA out of memory\nAnalysis: the batch does not fit\nSolution:\n  lower batch_size\n"), "{out}");
        assert!(
            out.contains("  [log:42] RuntimeError: CUDA out of memory"),
            "{out}"
        );
        assert!(!out.contains("LLM"), "{out}");
    }

    #[test]
    fn llm_analyses_follow_the_rules_answer_each_labelled() {
        let ok = diag::LlmAnalysis {
            kind: "worker".into(),
            replica: "ddp-worker-1".into(),
            status: diag::LlmStatus::Ok as i32,
            healthy: false,
            error: "OOMKilled".into(),
            analysis: "killed at line 9\n\u{1b}[31mthen the master timed out".into(),
            solution: "Raise the memory limit.".into(),
            model: "gpt-x".into(),
            prompt_version: "worker.tmpl@0123456789ab".into(),
            cached: true,
            ..Default::default()
        };
        let failed = diag::LlmAnalysis {
            kind: "master".into(),
            replica: "ddp-master-0".into(),
            status: diag::LlmStatus::Failed as i32,
            status_reason: "cannot reach the LLM endpoint: refused".into(),
            ..Default::default()
        };
        let pending = diag::LlmAnalysis {
            kind: "job".into(),
            status: diag::LlmStatus::Pending as i32,
            status_reason: "no answer within 10.0s".into(),
            ..Default::default()
        };
        let d = diag::Diagnosis {
            healthy: false,
            error: "Killed by the out-of-memory killer".into(),
            llm_text: "ignored when the analyses are there".into(),
            llm_analyses: vec![ok, failed, pending],
            ..Default::default()
        };
        let out = diagnosis(&d);
        let llm = out
            .split_once("\nThe LLM's view (beside the rules' answer above, not part of it):\n")
            .map(|(rules, llm)| {
                assert!(rules.starts_with("Healthy: No\nError: Killed by"), "{out}");
                llm
            })
            .unwrap_or_else(|| panic!("{out}"));
        assert_eq!(
            llm,
            "LLM analysis (worker ddp-worker-1; gpt-x, prompt worker.tmpl@0123456789ab, from an earlier diagnosis):\n\
             \x20 Healthy: No\n\
             \x20 Error: OOMKilled\n\
             \x20 Analysis:\n\
             \x20   killed at line 9\n\
             \x20    [31mthen the master timed out\n\
             \x20 Solution: Raise the memory limit.\n\
             LLM analysis (master ddp-master-0): failed: cannot reach the LLM endpoint: refused\n\
             LLM analysis (job): pending: no answer within 10.0s\n\
             Pending analyses go on: run the command again later for them (answers are reused).\n"
        );
    }

    #[test]
    fn an_older_service_s_llm_text_is_still_shown() {
        let d = diag::Diagnosis {
            llm_text: "Healthy: No\nError: x".into(),
            ..Default::default()
        };
        assert!(diagnosis(&d).ends_with("LLM analysis:\n  Healthy: No\n  Error: x\n"));
    }
}
