//! Prompt templates in the subset of Go's `text/template` that Aegis'
//! diagnosis prompts use, so that a prompt written for Aegis works here
//! unchanged:
//!
//! - `{{.ErrorInfo}}`, `{{.EventInfo}}`, `{{.LogInfo}}`;
//! - `{{.Metadata.JobName}}` and `{{ index .Metadata "JobName" }}` for the
//!   keys of [`MetaKey`];
//! - `{{-` and `-}}` trim the white space before / after the action;
//! - `{{/* comments */}}`.
//!
//! Aegis' prompts have no conditionals or loops, so `if`, `range`, pipes
//! and functions other than `index` are refused. A template is checked
//! whole when it is parsed: an unknown variable or key, or bad syntax, is
//! an error naming the template and the line and column, so a broken
//! prompt stops the service at start rather than a diagnosis later.

use std::fmt;

/// A key of `.Metadata`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetaKey {
    JobName,
    JobStatus,
    LauncherStatus,
    MasterExpected,
    MasterCreatedCount,
    WorkerExpected,
    WorkerCreatedCount,
    MasterDiagnosis,
    WorkerDiagnosis,
}

impl MetaKey {
    pub const ALL: [MetaKey; 9] = [
        MetaKey::JobName,
        MetaKey::JobStatus,
        MetaKey::LauncherStatus,
        MetaKey::MasterExpected,
        MetaKey::MasterCreatedCount,
        MetaKey::WorkerExpected,
        MetaKey::WorkerCreatedCount,
        MetaKey::MasterDiagnosis,
        MetaKey::WorkerDiagnosis,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            MetaKey::JobName => "JobName",
            MetaKey::JobStatus => "JobStatus",
            MetaKey::LauncherStatus => "LauncherStatus",
            MetaKey::MasterExpected => "MasterExpected",
            MetaKey::MasterCreatedCount => "MasterCreatedCount",
            MetaKey::WorkerExpected => "WorkerExpected",
            MetaKey::WorkerCreatedCount => "WorkerCreatedCount",
            MetaKey::MasterDiagnosis => "MasterDiagnosis",
            MetaKey::WorkerDiagnosis => "WorkerDiagnosis",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// The values a template is rendered with.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Vars {
    /// Indexed like [`MetaKey::ALL`].
    pub metadata: [String; 9],
    pub error_info: String,
    pub event_info: String,
    pub log_info: String,
}

impl Vars {
    pub fn set(&mut self, key: MetaKey, value: impl Into<String>) {
        self.metadata[key as usize] = value.into();
    }

    pub fn meta(&self, key: MetaKey) -> &str {
        &self.metadata[key as usize]
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Var {
    ErrorInfo,
    EventInfo,
    LogInfo,
    Meta(MetaKey),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Node {
    Text(String),
    Var(Var),
}

/// A parsed template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    nodes: Vec<Node>,
}

/// Why a template cannot be used, and where.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("template `{name}` line {line} column {column}: {message}")]
pub struct TemplateError {
    pub name: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

const SUPPORTED: &str = "supported are {{.ErrorInfo}}, {{.EventInfo}}, {{.LogInfo}}, \
                         {{.Metadata.Key}} and {{index .Metadata \"Key\"}}";

fn is_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\r' | '\n')
}

/// Parses the action between `{{` and `}}` (trim markers removed).
fn parse_action(body: &str) -> Result<Option<Var>, String> {
    let body = body.trim_matches(is_space);
    if body.starts_with("/*") {
        return if body.ends_with("*/") && body.len() >= 4 {
            Ok(None)
        } else {
            Err("a comment must be alone in its action: {{/* … */}}".into())
        };
    }
    if body.is_empty() {
        return Err(format!("empty action; {SUPPORTED}"));
    }
    let words = split_words(body)?;
    match words.as_slice() {
        [w] => parse_field(w).map(Some),
        [f, m, key] if f == "index" => {
            if m != ".Metadata" {
                return Err(format!("`index` is supported on .Metadata only, not `{m}`"));
            }
            let Some(k) = unquote(key) else {
                return Err(format!(
                    "the key of `index` must be a quoted string, not `{key}`"
                ));
            };
            MetaKey::parse(&k)
                .map(|k| Some(Var::Meta(k)))
                .ok_or_else(|| unknown_key(&k))
        }
        [f, ..] if f == "index" => Err("`index` takes .Metadata and one quoted key".into()),
        [first, ..] => {
            let what = if words.iter().any(|w| w == "|") {
                "pipelines".to_owned()
            } else {
                format!("`{first}`")
            };
            Err(format!("{what} not supported; {SUPPORTED}"))
        }
        [] => Err(format!("empty action; {SUPPORTED}")),
    }
}

fn unknown_key(k: &str) -> String {
    let keys: Vec<&str> = MetaKey::ALL.iter().map(|k| k.as_str()).collect();
    format!("unknown .Metadata key `{k}` (known: {})", keys.join(", "))
}

fn parse_field(w: &str) -> Result<Var, String> {
    match w {
        ".ErrorInfo" => Ok(Var::ErrorInfo),
        ".EventInfo" => Ok(Var::EventInfo),
        ".LogInfo" => Ok(Var::LogInfo),
        ".Metadata" => Err("`.Metadata` needs a key: {{.Metadata.JobName}}".into()),
        _ => match w.strip_prefix(".Metadata.") {
            Some(k) => MetaKey::parse(k)
                .map(Var::Meta)
                .ok_or_else(|| unknown_key(k)),
            None if w.starts_with('.') => Err(format!(
                "unknown variable `{w}` (known: .ErrorInfo, .EventInfo, .LogInfo, .Metadata)"
            )),
            None => Err(format!("`{w}` not supported; {SUPPORTED}")),
        },
    }
}

/// Words separated by white space; a quoted string is one word.
fn split_words(s: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut chars = s.chars().peekable();
    while let Some(&c) = chars.peek() {
        if is_space(c) {
            chars.next();
            continue;
        }
        let mut w = String::new();
        if c == '"' || c == '`' {
            w.push(c);
            chars.next();
            let mut closed = false;
            while let Some(d) = chars.next() {
                w.push(d);
                if d == '\\' && c == '"' {
                    if let Some(e) = chars.next() {
                        w.push(e);
                    }
                } else if d == c {
                    closed = true;
                    break;
                }
            }
            if !closed {
                return Err("unterminated string".into());
            }
        } else {
            while let Some(&d) = chars.peek() {
                if is_space(d) {
                    break;
                }
                w.push(d);
                chars.next();
            }
        }
        words.push(w);
    }
    Ok(words)
}

/// The value of a Go string literal ("…" with simple escapes, or `…`).
fn unquote(w: &str) -> Option<String> {
    if let Some(raw) = w.strip_prefix('`').and_then(|r| r.strip_suffix('`')) {
        return Some(raw.to_owned());
    }
    let inner = w.strip_prefix('"')?.strip_suffix('"')?;
    let mut out = String::new();
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next()? {
                '"' => out.push('"'),
                '\\' => out.push('\\'),
                'n' => out.push('\n'),
                't' => out.push('\t'),
                _ => return None,
            }
        } else {
            out.push(c);
        }
    }
    Some(out)
}

/// 1-based line and column (in characters) of byte offset `at`.
fn position(text: &str, at: usize) -> (usize, usize) {
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

impl Template {
    /// Parses `text`; `name` (a file name, "builtin:worker") is what
    /// errors cite.
    pub fn parse(name: &str, text: &str) -> Result<Self, TemplateError> {
        let err = |at: usize, message: String| {
            let (line, column) = position(text, at);
            TemplateError {
                name: name.to_owned(),
                line,
                column,
                message,
            }
        };
        let mut nodes = Vec::new();
        let mut rest = 0;
        // Set by `-}}`: the next text starts without its leading blanks.
        let mut trim_next = false;
        while let Some(found) = text[rest..].find("{{") {
            let open = rest + found;
            let mut chunk = &text[rest..open];
            if trim_next {
                chunk = chunk.trim_start_matches(is_space);
            }
            let after_open = &text[open + 2..];
            // Go wants white space after `{{-` (else `{{-3}}` is a number).
            let trim_before = after_open.starts_with("- ")
                || after_open.starts_with("-\t")
                || after_open.starts_with("-\n")
                || after_open.starts_with("-\r");
            if trim_before {
                chunk = chunk.trim_end_matches(is_space);
            }
            if !chunk.is_empty() {
                nodes.push(Node::Text(chunk.to_owned()));
            }
            let body_start = open + 2 + usize::from(trim_before);
            // A comment may hold `}}`: it ends at `*/`, then the action.
            let search_from = match text[body_start..].trim_start_matches(is_space) {
                c if c.starts_with("/*") => {
                    let c_start = text.len() - c.len();
                    match c[2..].find("*/") {
                        Some(end) => c_start + 2 + end + 2,
                        None => return Err(err(open, "unclosed comment".into())),
                    }
                }
                _ => body_start,
            };
            let Some(close_rel) = text[search_from..].find("}}") else {
                return Err(err(open, "unclosed action: `{{` without `}}`".into()));
            };
            let close = search_from + close_rel;
            let mut body = &text[body_start..close];
            trim_next = false;
            if let Some(b) = body.strip_suffix('-') {
                if b.ends_with(is_space) {
                    body = b;
                    trim_next = true;
                }
            }
            if let Some(var) = parse_action(body).map_err(|m| err(open, m))? {
                nodes.push(Node::Var(var));
            }
            rest = close + 2;
        }
        let mut tail = &text[rest..];
        if trim_next {
            tail = tail.trim_start_matches(is_space);
        }
        if !tail.is_empty() {
            nodes.push(Node::Text(tail.to_owned()));
        }
        Ok(Self { nodes })
    }

    pub fn render(&self, vars: &Vars) -> String {
        let mut out = String::new();
        for n in &self.nodes {
            match n {
                Node::Text(t) => out.push_str(t),
                Node::Var(Var::ErrorInfo) => out.push_str(&vars.error_info),
                Node::Var(Var::EventInfo) => out.push_str(&vars.event_info),
                Node::Var(Var::LogInfo) => out.push_str(&vars.log_info),
                Node::Var(Var::Meta(k)) => out.push_str(vars.meta(*k)),
            }
        }
        out
    }
}

impl fmt::Display for MetaKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
#[path = "template_tests.rs"]
mod tests;
