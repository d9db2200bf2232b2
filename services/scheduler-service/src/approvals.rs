//! Approvals: ordered rules (first match wins) decide at enqueue whether a
//! job waits in AWAITING_APPROVAL; approvers approve or reject with a
//! compare-and-set on PENDING; a pending approval past its TTL expires —
//! checked exactly (approve refuses it, the dispatch round expires due ones)
//! and by a periodic sweep.
//!
//! Rules file (YAML), all conditions of one `when` must hold:
//! ```yaml
//! rules:
//!   - name: big-gpu-jobs
//!     when: { gpus_above: 4 }
//!   - name: expensive
//!     when: { gpu_hours_above: 100 }   # GPUs x deadline hours; no deadline: 24 h
//!   - name: first-job
//!     when: { first_job_of_user: true }
//!   - name: prod-images
//!     when: { image_matches: "^registry.internal/prod/.*" }
//!   - name: labelled
//!     when: { label: { key: "tier", matches: "^prod$" } }
//! ttl: 24h     # s, m, h or d suffix, or plain seconds
//! ```

use std::collections::HashMap;
use std::time::Duration;

use regex::Regex;
use serde::Deserialize;

/// GPU-hours of a job without a deadline are counted over this long.
pub const ASSUMED_HOURS_WITHOUT_DEADLINE: f64 = 24.0;
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    #[serde(default)]
    rules: Vec<RuleFile>,
    #[serde(default)]
    ttl: Option<serde_yaml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    name: String,
    when: WhenFile,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct WhenFile {
    gpus_above: Option<u32>,
    gpu_hours_above: Option<f64>,
    first_job_of_user: Option<bool>,
    image_matches: Option<String>,
    label: Option<LabelFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LabelFile {
    key: String,
    matches: String,
}

/// One compiled rule.
#[derive(Clone, Debug)]
pub struct Rule {
    pub name: String,
    gpus_above: Option<u32>,
    gpu_hours_above: Option<f64>,
    first_job_of_user: bool,
    image: Option<Regex>,
    label: Option<(String, Regex)>,
}

/// The rules in file order, and the TTL the file sets (if any).
#[derive(Clone, Debug, Default)]
pub struct Rules {
    pub rules: Vec<Rule>,
    pub ttl: Option<Duration>,
}

/// What the rules look at.
pub struct JobFacts<'a> {
    pub gpus: u32,
    pub deadline: Option<Duration>,
    pub image: &'a str,
    pub labels: &'a HashMap<String, String>,
    /// Whether the owner has no earlier job; asked only when a rule needs it.
    pub first_job_of_user: bool,
}

/// Parses "90", "90s", "30m", "24h", "2d".
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (num, mult) = match s.chars().last()? {
        's' => (&s[..s.len() - 1], 1),
        'm' => (&s[..s.len() - 1], 60),
        'h' => (&s[..s.len() - 1], 3600),
        'd' => (&s[..s.len() - 1], 86_400),
        _ => (s, 1),
    };
    let n: u64 = num.trim().parse().ok()?;
    n.checked_mul(mult).map(Duration::from_secs)
}

impl Rules {
    /// Parses a rules file; errors name the rule and the field.
    pub fn parse(yaml: &str) -> anyhow::Result<Self> {
        let file: RulesFile =
            serde_yaml::from_str(yaml).map_err(|e| anyhow::anyhow!("approval rules: {e}"))?;
        let ttl = match file.ttl {
            None => None,
            Some(serde_yaml::Value::Number(n)) => {
                Some(Duration::from_secs(n.as_u64().ok_or_else(|| {
                    anyhow::anyhow!("approval rules: `ttl` must be positive")
                })?))
            }
            Some(serde_yaml::Value::String(s)) => Some(parse_duration(&s).ok_or_else(|| {
                anyhow::anyhow!("approval rules: `ttl` `{s}` is not like 24h, 30m or 90s")
            })?),
            Some(_) => {
                anyhow::bail!("approval rules: `ttl` must be like 24h or a number of seconds")
            }
        };
        let mut rules = Vec::with_capacity(file.rules.len());
        for (i, r) in file.rules.into_iter().enumerate() {
            let name = r.name.trim().to_owned();
            if name.is_empty() {
                anyhow::bail!("approval rules: rules[{i}].name is required");
            }
            let w = r.when;
            let image = w
                .image_matches
                .as_deref()
                .map(Regex::new)
                .transpose()
                .map_err(|e| anyhow::anyhow!("approval rule `{name}`: when.image_matches: {e}"))?;
            let label = match w.label {
                None => None,
                Some(l) => Some((
                    l.key,
                    Regex::new(&l.matches).map_err(|e| {
                        anyhow::anyhow!("approval rule `{name}`: when.label.matches: {e}")
                    })?,
                )),
            };
            let rule = Rule {
                name,
                gpus_above: w.gpus_above,
                gpu_hours_above: w.gpu_hours_above,
                first_job_of_user: w.first_job_of_user.unwrap_or(false),
                image,
                label,
            };
            if rule.gpus_above.is_none()
                && rule.gpu_hours_above.is_none()
                && !rule.first_job_of_user
                && rule.image.is_none()
                && rule.label.is_none()
            {
                anyhow::bail!("approval rule `{}`: `when` has no condition", rule.name);
            }
            rules.push(rule);
        }
        Ok(Rules { rules, ttl })
    }

    pub fn load(path: &std::path::Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read approval rules {}: {e}", path.display()))?;
        Self::parse(&text)
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether matching needs to know if this is the owner's first job.
    pub fn needs_first_job(&self) -> bool {
        self.rules.iter().any(|r| r.first_job_of_user)
    }

    /// The first rule the job matches.
    pub fn first_match(&self, f: &JobFacts<'_>) -> Option<&Rule> {
        self.rules.iter().find(|r| r.matches(f))
    }
}

impl Rule {
    fn matches(&self, f: &JobFacts<'_>) -> bool {
        if let Some(n) = self.gpus_above {
            if f.gpus <= n {
                return false;
            }
        }
        if let Some(n) = self.gpu_hours_above {
            let hours = f
                .deadline
                .filter(|d| !d.is_zero())
                .map(|d| d.as_secs_f64() / 3600.0)
                .unwrap_or(ASSUMED_HOURS_WITHOUT_DEADLINE);
            if f64::from(f.gpus) * hours <= n {
                return false;
            }
        }
        if self.first_job_of_user && !f.first_job_of_user {
            return false;
        }
        if let Some(re) = &self.image {
            if !re.is_match(f.image) {
                return false;
            }
        }
        if let Some((key, re)) = &self.label {
            match f.labels.get(key) {
                Some(v) if re.is_match(v) => {}
                _ => return false,
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
rules:
  - name: big-gpu-jobs
    when: { gpus_above: 4 }
  - name: expensive
    when: { gpu_hours_above: 100 }
  - name: prod-images
    when: { image_matches: "^registry.internal/prod/.*" }
  - name: labelled
    when: { label: { key: "tier", matches: "^prod$" } }
  - name: first-job
    when: { first_job_of_user: true }
ttl: 2h
"#;

    fn facts<'a>(gpus: u32, image: &'a str, labels: &'a HashMap<String, String>) -> JobFacts<'a> {
        JobFacts {
            gpus,
            deadline: None,
            image,
            labels,
            first_job_of_user: false,
        }
    }

    #[test]
    fn first_matching_rule_wins() {
        let rules = Rules::parse(FILE).unwrap();
        assert_eq!(rules.ttl, Some(Duration::from_secs(7200)));
        let none = HashMap::new();
        let name = |f: &JobFacts<'_>| rules.first_match(f).map(|r| r.name.clone());
        assert_eq!(name(&facts(8, "x", &none)).as_deref(), Some("big-gpu-jobs"));
        // 4 GPUs x 24 h assumed = 96 <= 100; with a 48 h deadline 192 > 100.
        assert_eq!(name(&facts(4, "x", &none)), None);
        let mut f = facts(4, "x", &none);
        f.deadline = Some(Duration::from_secs(48 * 3600));
        assert_eq!(name(&f).as_deref(), Some("expensive"));
        assert_eq!(
            name(&facts(0, "registry.internal/prod/a", &none)).as_deref(),
            Some("prod-images")
        );
        let labels = HashMap::from([("tier".to_owned(), "prod".to_owned())]);
        assert_eq!(name(&facts(0, "x", &labels)).as_deref(), Some("labelled"));
        let mut f = facts(0, "x", &none);
        f.first_job_of_user = true;
        assert_eq!(name(&f).as_deref(), Some("first-job"));
        assert!(rules.needs_first_job());
    }

    #[test]
    fn bad_rules_name_the_rule_and_field() {
        let e = Rules::parse("rules:\n  - name: x\n    when: { image_matches: \"(\" }\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`x`") && e.contains("image_matches"), "{e}");
        let e = Rules::parse("rules:\n  - name: y\n    when: {}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no condition"), "{e}");
        assert!(Rules::parse("ttl: soon\n").is_err());
        assert_eq!(parse_duration("90"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("1d"), Some(Duration::from_secs(86_400)));
    }
}
