//! Reading a model's answer into `Healthy` / `Error` / `Analysis` /
//! `Solution`. Models decorate: `**Healthy:** No`, `### Analysis`,
//! `- Error: …`, lower case, a full-width colon after a Chinese prompt, an
//! analysis over several lines or paragraphs. Whatever follows a field's
//! label, up to the next label, is that field.

use std::sync::LazyLock;

use regex::Regex;

/// The four fields of an answer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Answer {
    pub healthy: bool,
    pub error: String,
    pub analysis: String,
    pub solution: String,
}

/// A label at the start of a line: list and quote markers, heading hashes
/// and bold/italic marks around it, then a colon, or nothing after a
/// heading.
static LABEL: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?ix)^
        [\s>*\-+\#]*            # list, quote, heading marks
        [*_]{0,3}\s*
        (healthy|error|analysis|solution)
        \s*[*_]{0,3}\s*
        (?: [:：] | $ )
        [*_]{0,3}
        (.*)$",
    )
    .expect("static regex")
});

#[derive(Clone, Copy, PartialEq, Eq)]
enum Field {
    Healthy,
    Error,
    Analysis,
    Solution,
}

fn field(label: &str) -> Field {
    match label.to_ascii_lowercase().as_str() {
        "healthy" => Field::Healthy,
        "error" => Field::Error,
        "analysis" => Field::Analysis,
        _ => Field::Solution,
    }
}

/// `Yes`, `{No}`, `**No**`, `true`, `是`: whether the answer says healthy;
/// `None` when it says neither.
fn yes_no(value: &str) -> Option<bool> {
    let v = value
        .trim()
        .trim_matches(|c: char| matches!(c, '{' | '}' | '*' | '_' | '`' | '"' | '\'' | '[' | ']'))
        .trim()
        .to_lowercase();
    let word: String = v.chars().take_while(|c| c.is_alphanumeric()).collect();
    match word.as_str() {
        "yes" | "true" | "healthy" => Some(true),
        "no" | "false" | "unhealthy" => Some(false),
        _ if v.starts_with('是') || v.starts_with("健康") => Some(true),
        _ if v.starts_with('否') || v.starts_with("不健康") => Some(false),
        _ => None,
    }
}

/// Drops a leading/trailing run of bold marks that belonged to the label
/// line (`**Error:** x` leaves `x`), and surrounding blank lines.
fn tidy(lines: &[String]) -> String {
    let text = lines.join("\n");
    let text = text.trim();
    let text = text.strip_prefix("**").unwrap_or(text);
    text.trim().to_owned()
}

/// The answer's fields, or `None` when `text` has neither a `Healthy` nor
/// an `Error` label (not an answer in the asked format).
pub fn parse(text: &str) -> Option<Answer> {
    let mut sections: Vec<(Field, Vec<String>)> = Vec::new();
    let mut in_code = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
        }
        let label = (!in_code).then(|| LABEL.captures(line)).flatten();
        match label {
            Some(c) => {
                let f = field(&c[1]);
                let rest = c.get(2).map_or("", |m| m.as_str());
                sections.push((f, vec![rest.trim().to_owned()]));
            }
            None => {
                if let Some((_, body)) = sections.last_mut() {
                    body.push(line.to_owned());
                }
            }
        }
    }
    let get = |f: Field| {
        sections
            .iter()
            .find(|(g, _)| *g == f)
            .map(|(_, body)| tidy(body))
    };
    let healthy = get(Field::Healthy);
    let error = get(Field::Error);
    if healthy.is_none() && error.is_none() {
        return None;
    }
    let error = error.unwrap_or_default();
    let healthy = match healthy.as_deref().and_then(yes_no) {
        Some(h) => h,
        // No verdict: an error other than "none" means unhealthy.
        None => {
            let e = error.trim().trim_matches('.').to_lowercase();
            e.is_empty() || e == "none" || e == "n/a"
        }
    };
    Some(Answer {
        healthy,
        error,
        analysis: get(Field::Analysis).unwrap_or_default(),
        solution: get(Field::Solution).unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plain_format_parses() {
        let a = parse(
            "Healthy: No\nError: CUDA OOM on rank 1\nAnalysis: line 12 shows it.\nSolution: Lower the batch size.",
        )
        .unwrap();
        assert_eq!(
            a,
            Answer {
                healthy: false,
                error: "CUDA OOM on rank 1".into(),
                analysis: "line 12 shows it.".into(),
                solution: "Lower the batch size.".into(),
            }
        );
    }

    #[test]
    fn markdown_case_and_multi_line_sections_parse() {
        let text = "Here is my diagnosis.\n\n**Healthy:** no\n**Error**: Worker 1 was OOMKilled\n\n\
                    ### Analysis\nThe worker was killed (exit 137).\n\n```\n[ddp-worker-1] Killed\nError: not a label\n```\n\
                    Then the master timed out.\n\n- **solution:** 1. Raise the memory limit.\n2. Retry.\n";
        let a = parse(text).unwrap();
        assert!(!a.healthy);
        assert_eq!(a.error, "Worker 1 was OOMKilled");
        assert!(a.analysis.starts_with("The worker was killed (exit 137)."));
        assert!(a.analysis.contains("Error: not a label"));
        assert!(a.analysis.ends_with("Then the master timed out."));
        assert_eq!(a.solution, "1. Raise the memory limit.\n2. Retry.");
    }

    #[test]
    fn braces_full_width_colons_and_chinese_verdicts_parse() {
        let a = parse("Healthy：{Yes}\nError：None").unwrap();
        assert!(a.healthy);
        assert_eq!(a.error, "None");
        assert!(!parse("Healthy: 否\nError: 显存不足").unwrap().healthy);
        assert!(parse("HEALTHY: yes").unwrap().healthy);
    }

    #[test]
    fn without_a_verdict_the_error_decides() {
        assert!(!parse("Error: NCCL timeout").unwrap().healthy);
        assert!(parse("Error: None.").unwrap().healthy);
        assert!(!parse("Healthy: maybe\nError: disk full").unwrap().healthy);
    }

    #[test]
    fn text_without_the_fields_is_not_an_answer() {
        assert_eq!(parse(""), None);
        assert_eq!(parse("I cannot help with that."), None);
        assert_eq!(parse("{\"choices\": []}"), None);
        assert_eq!(parse("An error occurred while thinking."), None);
    }
}
