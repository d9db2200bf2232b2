//! The rule set: ordered data, not code. Each rule names what it matches
//! (log regexes, exit codes, error types and categories, failure causes, a
//! spec check) and what to say (category, summary, hint). A rule matches
//! when any of its conditions does. The built-in rules are YAML too
//! (`rules/builtin.yaml`, compiled in), in the order that lets a root cause
//! win over its echoes. Extra rules can be loaded from YAML
//! (`--rules-file`); they are tried before the built-in ones, and one with
//! the id of a built-in rule replaces it in place.
//!
//! ```yaml
//! rules:
//!   - id: hf-hub-offline
//!     layer: execution          # resource | control | execution
//!     severity: error           # error (default) | warning
//!     category: network
//!     summary: Hugging Face Hub unreachable
//!     hint: Mount the model locally or set HF_HUB_OFFLINE=1 with a warm cache.
//!     log_patterns: ["We couldn't connect to 'https://huggingface.co'"]
//!     exit_codes: []
//!     error_types: []
//!     error_categories: []
//!     failure_causes: []        # user-code, setup, image-pull, platform, deadline, signal, …
//!     min_matches: 1            # log lines that must match
//!     when_failed: false        # only for a failed job (weak signs)
//!     without_exception: false  # only when the error carries no traceback
//! ```

use std::collections::HashSet;

use regex::Regex;
use serde::Deserialize;
use trainmesh_common::proto::job::v1 as jpb;

use crate::checks;
use crate::domain::{Evidence, Finding, JobFacts, Layer, LogLine, Severity};

/// Log lines cited per finding: the first few and the last few matches.
const MAX_LOG_EVIDENCE: usize = 5;

/// A rule as written (in code or YAML).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    pub id: String,
    pub layer: Layer,
    #[serde(default)]
    pub severity: Severity,
    pub category: String,
    /// May use `{error}` (the job error's `Type: message`) and `{exit_code}`.
    pub summary: String,
    pub hint: String,
    /// Regexes (case-insensitive) over each log line and the job's error text.
    #[serde(default)]
    pub log_patterns: Vec<String>,
    #[serde(default)]
    pub exit_codes: Vec<i32>,
    /// The error's type, with or without its module (`OutOfMemoryError`
    /// matches `torch.OutOfMemoryError`).
    #[serde(default)]
    pub error_types: Vec<String>,
    #[serde(default)]
    pub error_categories: Vec<String>,
    #[serde(default)]
    pub failure_causes: Vec<String>,
    /// Control check: a replica (pod) of the last attempt ended or waits
    /// with one of these reasons (OOMKilled, CrashLoopBackOff, …).
    #[serde(default)]
    pub replica_reasons: Vec<String>,
    /// Control check: fewer replicas were created than the job asked for.
    #[serde(default)]
    pub replicas_missing: bool,
    /// Spec check: no runner could take one replica of the job (GPUs of
    /// its type, CPU, memory), as the scheduler lists them.
    #[serde(default)]
    pub beyond_fleet: bool,
    /// Spec check: the deadline is shorter than earlier successful runs of
    /// a job of the same owner and name took.
    #[serde(default)]
    pub deadline_below_history: bool,
    /// Spec check: the job asks for GPUs with less shared memory than this.
    #[serde(default)]
    pub gpu_shm_below_mib: Option<i64>,
    /// Matches a failed job that no earlier error rule explained.
    #[serde(default)]
    pub fallback: bool,
    /// Log lines that must match before the patterns count (default 1):
    /// for signs that mean something only when they repeat.
    #[serde(default)]
    pub min_matches: Option<usize>,
    /// Only for a failed job: signs that a running job may show and get
    /// over.
    #[serde(default)]
    pub when_failed: bool,
    /// Only when the job's error carries no traceback: weak signs that
    /// must not outrank an exception the job raised itself.
    #[serde(default)]
    pub without_exception: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    rules: Vec<RuleSpec>,
}

#[derive(Debug)]
struct Rule {
    spec: RuleSpec,
    patterns: Vec<Regex>,
}

impl Rule {
    fn compile(spec: RuleSpec) -> anyhow::Result<Self> {
        if spec.id.trim().is_empty() {
            anyhow::bail!("a rule has an empty id");
        }
        let patterns = spec
            .log_patterns
            .iter()
            .map(|p| {
                Regex::new(&format!("(?i){p}"))
                    .map_err(|e| anyhow::anyhow!("rule `{}`: bad pattern `{p}`: {e}", spec.id))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self { spec, patterns })
    }
}

/// Kebab-case name of a failure cause, as rules name it.
pub fn cause_name(c: jpb::FailureCause) -> &'static str {
    match c {
        jpb::FailureCause::Unspecified => "",
        jpb::FailureCause::UserCode => "user-code",
        jpb::FailureCause::Setup => "setup",
        jpb::FailureCause::NoCapacity => "no-capacity",
        jpb::FailureCause::Platform => "platform",
        jpb::FailureCause::ApprovalExpired => "approval-expired",
        jpb::FailureCause::Deadline => "deadline",
        jpb::FailureCause::ImagePull => "image-pull",
        jpb::FailureCause::Signal => "signal",
        jpb::FailureCause::Cancelled => "cancelled",
        jpb::FailureCause::Preempted => "preempted",
        jpb::FailureCause::Refused => "refused",
    }
}

fn type_matches(actual: &str, wanted: &str) -> bool {
    let actual = actual.trim();
    actual.eq_ignore_ascii_case(wanted)
        || actual
            .rsplit_once('.')
            .is_some_and(|(_, last)| last.eq_ignore_ascii_case(wanted))
}

/// The ordered rules.
#[derive(Debug)]
pub struct RuleSet {
    rules: Vec<Rule>,
    /// Every rule's log patterns in one automaton, so a long log is read
    /// once rather than once per pattern. ASCII semantics (`\b`, `\w`,
    /// case folding): Unicode word boundaries keep the regex engine off its
    /// fast DFA, and log keywords are ASCII.
    all_patterns: regex::bytes::RegexSet,
    /// For each pattern of `all_patterns`, the index of its rule.
    owner: Vec<usize>,
}

impl RuleSet {
    pub fn builtin() -> Self {
        Self::with_extra(Vec::new()).expect("built-in rules parse and compile")
    }

    /// `extra` first, replacing built-in rules with the same id in place.
    pub fn with_extra(extra: Vec<RuleSpec>) -> anyhow::Result<Self> {
        let mut specs = builtin_specs();
        let mut front = Vec::new();
        let mut ids = HashSet::new();
        for s in extra {
            if !ids.insert(s.id.clone()) {
                anyhow::bail!("rule `{}` is defined twice", s.id);
            }
            match specs.iter_mut().find(|b| b.id == s.id) {
                Some(b) => *b = s,
                None => front.push(s),
            }
        }
        front.extend(specs);
        let rules: Vec<Rule> = front
            .into_iter()
            .map(Rule::compile)
            .collect::<anyhow::Result<_>>()?;
        let mut owner = Vec::new();
        let mut sources = Vec::new();
        for (i, r) in rules.iter().enumerate() {
            for p in &r.patterns {
                owner.push(i);
                sources.push(p.as_str().to_owned());
            }
        }
        let all_patterns = regex::bytes::RegexSetBuilder::new(&sources)
            .unicode(false)
            .size_limit(64 << 20)
            .dfa_size_limit(64 << 20)
            .build()
            .map_err(|e| anyhow::anyhow!("the rules' patterns do not compile together: {e}"))?;
        Ok(Self {
            rules,
            all_patterns,
            owner,
        })
    }

    /// Parses a rules file (see the module docs).
    pub fn parse_yaml(text: &str) -> anyhow::Result<Vec<RuleSpec>> {
        let file: RulesFile = serde_yaml::from_str(text)?;
        Ok(file.rules)
    }

    pub fn load_file(path: &std::path::Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read rules file {}: {e}", path.display()))?;
        let extra = Self::parse_yaml(&text)
            .map_err(|e| anyhow::anyhow!("rules file {}: {e}", path.display()))?;
        Self::with_extra(extra).map_err(|e| anyhow::anyhow!("rules file {}: {e}", path.display()))
    }

    pub fn ids(&self) -> Vec<&str> {
        self.rules.iter().map(|r| r.spec.id.as_str()).collect()
    }

    /// Findings in rule order, errors before warnings.
    pub fn evaluate(&self, job: &JobFacts, log: &[LogLine]) -> Vec<Finding> {
        let hits = self.log_hits(log);
        let mut findings: Vec<Finding> = Vec::new();
        for (rule, hits) in self.rules.iter().zip(&hits) {
            let explained = findings.iter().any(|f| f.severity == Severity::Error);
            if let Some(f) = apply(rule, job, hits, explained) {
                findings.push(f);
            }
        }
        // Stable: rule order within each severity.
        findings.sort_by_key(|f| f.severity == Severity::Warning);
        findings
    }
}

impl RuleSet {
    /// For each rule, the log lines any of its patterns match, in order.
    /// Most lines match nothing, and one pass of the combined automaton
    /// says so; only the lines it flags are asked which patterns.
    fn log_hits<'a>(&self, log: &'a [LogLine]) -> Vec<Vec<&'a LogLine>> {
        let mut hits: Vec<Vec<&LogLine>> = vec![Vec::new(); self.rules.len()];
        for line in log {
            let text = line.text.as_bytes();
            if !self.all_patterns.is_match(text) {
                continue;
            }
            for p in self.all_patterns.matches(text).iter() {
                let rule = &mut hits[self.owner[p]];
                if !rule.last().is_some_and(|l| std::ptr::eq(*l, line)) {
                    rule.push(line);
                }
            }
        }
        hits
    }
}

fn apply(rule: &Rule, job: &JobFacts, hits: &[&LogLine], explained: bool) -> Option<Finding> {
    let s = &rule.spec;
    let error = job.error.as_ref();
    if s.when_failed && job.state != jpb::JobState::Failed {
        return None;
    }
    if s.without_exception && error.is_some_and(|e| !e.traceback.trim().is_empty()) {
        return None;
    }
    let mut evidence: Vec<Evidence> = Vec::new();
    let headline = error.map(|e| e.headline()).unwrap_or_default();
    let mut cite_error = false;

    if let Some(code) = job.exit_code.filter(|c| s.exit_codes.contains(c)) {
        evidence.push(Evidence::error(format!("exit code {code}")));
    }
    if let Some(e) = error {
        if s.error_types.iter().any(|t| type_matches(&e.kind, t))
            || s.error_categories.contains(&e.category)
        {
            cite_error = true;
        }
    }
    let cause = cause_name(job.failure_cause);
    if !cause.is_empty() && s.failure_causes.iter().any(|c| c == cause) {
        let reason = if job.state_reason.is_empty() {
            String::new()
        } else {
            format!(": {}", job.state_reason)
        };
        evidence.push(Evidence::error(format!("failure cause {cause}{reason}")));
    }
    if !rule.patterns.is_empty() {
        let hits: &[&LogLine] = if hits.len() < s.min_matches.unwrap_or(1) {
            &[]
        } else {
            hits
        };
        let cited: Vec<&&LogLine> = if hits.len() > MAX_LOG_EVIDENCE {
            let head = MAX_LOG_EVIDENCE - 2;
            hits[..head].iter().chain(&hits[hits.len() - 2..]).collect()
        } else {
            hits.iter().collect()
        };
        evidence.extend(cited.into_iter().map(|l| Evidence::log(l)));
        if let Some(e) = error.filter(|_| s.min_matches.unwrap_or(1) <= 1) {
            let text = e.text();
            if rule.patterns.iter().any(|p| p.is_match(&text)) {
                cite_error = true;
            }
        }
    }
    for r in job.replicas.iter().filter(|r| {
        s.replica_reasons
            .iter()
            .any(|w| w.eq_ignore_ascii_case(&r.reason))
    }) {
        evidence.push(Evidence::event(r.describe()));
    }
    if s.replicas_missing {
        if let Some((expected, created)) = job.replica_counts().filter(|(e, c)| c < e) {
            evidence.push(Evidence::event(format!(
                "{created} of {expected} replicas were created"
            )));
        }
    }
    if s.beyond_fleet {
        if let Some(e) = checks::beyond_fleet(job) {
            evidence.push(e);
        }
    }
    if s.deadline_below_history {
        if let Some(e) = checks::deadline_below_history(&job.checks) {
            evidence.push(e);
        }
    }
    if let Some(min) = s.gpu_shm_below_mib {
        if job.gpus > 0 && job.shm_mib < min {
            evidence.push(Evidence::spec(format!(
                "resources.gpus = {}, resources.shm_mib = {} (container default when 0)",
                job.gpus, job.shm_mib
            )));
        }
    }
    let fallback = s.fallback && !explained && job.state == jpb::JobState::Failed;
    if fallback {
        cite_error = true;
        if error.is_none() {
            if let Some(code) = job.exit_code {
                evidence.push(Evidence::error(format!("exit code {code}")));
            }
            if !job.state_reason.is_empty() {
                evidence.push(Evidence::error(job.state_reason.clone()));
            }
        }
    }
    if cite_error && !headline.is_empty() {
        evidence.insert(0, Evidence::error(headline.clone()));
    }
    if evidence.is_empty() && !fallback {
        return None;
    }
    let mut seen = HashSet::new();
    evidence.retain(|e| seen.insert(e.clone()));
    let exit = job.exit_code.map(|c| c.to_string()).unwrap_or_default();
    let error_text = if headline.is_empty() {
        match job.exit_code {
            Some(c) => format!("exit code {c}"),
            None => "an unknown error".to_owned(),
        }
    } else {
        headline
    };
    // The fallback keeps the runner's classification when it made one.
    let category = match error {
        Some(e) if fallback && !e.category.is_empty() => e.category.clone(),
        _ => s.category.clone(),
    };
    Some(Finding {
        rule_id: s.id.clone(),
        layer: s.layer,
        severity: s.severity,
        category,
        summary: s
            .summary
            .replace("{error}", &error_text)
            .replace("{exit_code}", &exit),
        hint: s.hint.clone(),
        evidence,
    })
}

/// The built-in rules, most specific root causes first.
const BUILTIN_YAML: &str = include_str!("../rules/builtin.yaml");

pub fn builtin_specs() -> Vec<RuleSpec> {
    RuleSet::parse_yaml(BUILTIN_YAML).expect("the built-in rules file parses")
}

#[cfg(test)]
#[path = "rules_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "rules_control_tests.rs"]
mod control_tests;

#[cfg(test)]
#[path = "rules_each_tests.rs"]
mod each_tests;
