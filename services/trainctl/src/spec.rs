//! Job spec files: YAML that mirrors `trainmesh.job.v1.JobSpec` in
//! snake_case, parsed strictly (an unknown field is an error naming it and
//! its line) and converted into the proto message.
//!
//! Durations are strings such as `"30s"`, `"10m"`, `"2h"`, `"1h30m"` or
//! `"500ms"`. Map values (labels, env, hyperparameters) may be written as
//! strings, numbers or booleans; they are sent as strings.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;
use std::time::Duration;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use trainmesh_common::proto::job::v1 as pb;

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JobSpecFile {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub labels: StringMap,
    #[serde(default)]
    pub image: String,
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default)]
    pub env: StringMap,
    /// Variable -> name of a secret held where the job runs.
    #[serde(default)]
    pub secret_env: StringMap,
    /// Variables of `env` whose values are secrets: stored only sealed.
    #[serde(default)]
    pub secret_env_keys: Vec<String>,
    #[serde(default)]
    pub working_dir: String,
    pub resources: Option<ResourcesFile>,
    pub replicas: Option<ReplicasFile>,
    pub training: Option<TrainingFile>,
    #[serde(default)]
    pub priority: i32,
    pub retry_policy: Option<RetryPolicyFile>,
    pub deadline: Option<SpecDuration>,
    pub termination_grace: Option<SpecDuration>,
}

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ResourcesFile {
    #[serde(default)]
    pub gpus: i32,
    #[serde(default)]
    pub gpu_type: String,
    #[serde(default)]
    pub cpu: f64,
    #[serde(default)]
    pub memory_mib: i64,
    #[serde(default)]
    pub shm_mib: i64,
}

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ReplicasFile {
    #[serde(default)]
    pub masters: i32,
    #[serde(default)]
    pub workers: i32,
}

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainingFile {
    pub algorithm: Option<Algorithm>,
    #[serde(default)]
    pub model: String,
    #[serde(default)]
    pub dataset_path: String,
    #[serde(default)]
    pub output_path: String,
    #[serde(default)]
    pub hyperparameters: StringMap,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    Sft,
    Ppo,
    Grpo,
    Dpo,
    Pretrain,
    Other,
}

impl From<Algorithm> for pb::TrainingAlgorithm {
    fn from(a: Algorithm) -> Self {
        match a {
            Algorithm::Sft => pb::TrainingAlgorithm::Sft,
            Algorithm::Ppo => pb::TrainingAlgorithm::Ppo,
            Algorithm::Grpo => pb::TrainingAlgorithm::Grpo,
            Algorithm::Dpo => pb::TrainingAlgorithm::Dpo,
            Algorithm::Pretrain => pb::TrainingAlgorithm::Pretrain,
            Algorithm::Other => pb::TrainingAlgorithm::Other,
        }
    }
}

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicyFile {
    #[serde(default)]
    pub max_attempts: i32,
    #[serde(default)]
    pub retry_user_errors: bool,
    pub initial_backoff: Option<SpecDuration>,
    pub max_backoff: Option<SpecDuration>,
    /// `more_memory` (the default) or `fail`.
    pub on_oom_killed: Option<OomKilledFile>,
    #[serde(default)]
    pub memory_factor: f64,
    #[serde(default)]
    pub max_memory_mib: i64,
    /// `other_runner` (the default) or `fail`.
    pub on_node_fault: Option<NodeFaultFile>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OomKilledFile {
    MoreMemory,
    Fail,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum NodeFaultFile {
    OtherRunner,
    Fail,
}

/// A duration written as `"30s"`, `"10m"`, `"2h"`, `"1h30m"`, `"250ms"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecDuration(pub Duration);

impl<'de> Deserialize<'de> for SpecDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = SpecDuration;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration string such as \"30s\", \"10m\" or \"2h\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<SpecDuration, E> {
                parse_duration(v).map(SpecDuration).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<SpecDuration, E> {
                Err(E::custom(format!(
                    "duration {v} needs a unit: write e.g. \"{v}s\" or \"{v}m\""
                )))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<SpecDuration, E> {
                self.visit_i64(v as i64)
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<SpecDuration, E> {
                Err(E::custom(format!(
                    "duration {v} needs a unit: write e.g. \"{v}s\""
                )))
            }
        }
        d.deserialize_any(V)
    }
}

/// Parses `"1h30m"`, `"45s"`, `"1.5s"`, `"250ms"`, `"2d"`. A unit is required.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    if s.is_empty() {
        return Err("empty duration: write e.g. \"30s\", \"10m\" or \"2h\"".into());
    }
    let bad = || {
        format!("invalid duration `{text}`: write e.g. \"30s\", \"10m\", \"2h\" or \"1h30m\" (units: ms, s, m, h, d)")
    };
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return Err(bad());
        }
        let number: f64 = rest[..num_len].parse().map_err(|_| bad())?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds_per_unit = match &rest[..unit_len] {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "d" => 86400.0,
            "" => {
                return Err(format!(
                    "duration `{text}` needs a unit: write e.g. \"{text}s\" (units: ms, s, m, h, d)"
                ))
            }
            _ => return Err(bad()),
        };
        rest = &rest[unit_len..];
        total += number * seconds_per_unit;
    }
    // Ten years is far beyond any job deadline; the bound keeps the
    // conversion exact and away from float overflow.
    if !total.is_finite() || total > 315_360_000.0 {
        return Err(format!("duration `{text}` is too long"));
    }
    Ok(Duration::from_secs_f64(total))
}

/// A string-to-string map that also accepts numbers and booleans as values
/// (`batch_size: 8`), since that is how people write YAML.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StringMap(pub BTreeMap<String, String>);

impl<'de> Deserialize<'de> for StringMap {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct MapV;
        impl<'de> Visitor<'de> for MapV {
            type Value = StringMap;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map of names to values")
            }
            fn visit_unit<E: de::Error>(self) -> Result<StringMap, E> {
                Ok(StringMap::default())
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<StringMap, A::Error> {
                let mut out = BTreeMap::new();
                while let Some((k, v)) = map.next_entry::<String, ScalarString>()? {
                    out.insert(k, v.0);
                }
                Ok(StringMap(out))
            }
        }
        d.deserialize_any(MapV)
    }
}

struct ScalarString(String);

impl<'de> Deserialize<'de> for ScalarString {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ScalarString;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string, number or boolean")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ScalarString, E> {
                Ok(ScalarString(v.to_owned()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<ScalarString, E> {
                Ok(ScalarString(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ScalarString, E> {
                Ok(ScalarString(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ScalarString, E> {
                Ok(ScalarString(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<ScalarString, E> {
                Ok(ScalarString(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

impl StringMap {
    fn into_proto(self) -> HashMap<String, String> {
        self.0.into_iter().collect()
    }
}

fn duration(d: Option<SpecDuration>) -> Option<prost_types::Duration> {
    d.map(|d| trainmesh_common::time::to_duration(d.0))
}

impl From<JobSpecFile> for pb::JobSpec {
    fn from(f: JobSpecFile) -> Self {
        pb::JobSpec {
            name: f.name,
            labels: f.labels.into_proto(),
            image: f.image,
            command: f.command,
            env: f.env.into_proto(),
            secret_env: f.secret_env.into_proto(),
            secret_env_keys: f.secret_env_keys,
            working_dir: f.working_dir,
            resources: f.resources.map(|r| pb::Resources {
                gpus: r.gpus,
                gpu_type: r.gpu_type,
                cpu: r.cpu,
                memory_mib: r.memory_mib,
                shm_mib: r.shm_mib,
            }),
            replicas: f.replicas.map(|r| pb::Replicas {
                masters: r.masters,
                workers: r.workers,
            }),
            training: f.training.map(|t| pb::Training {
                algorithm: t
                    .algorithm
                    .map(|a| pb::TrainingAlgorithm::from(a) as i32)
                    .unwrap_or_default(),
                model: t.model,
                dataset_path: t.dataset_path,
                output_path: t.output_path,
                hyperparameters: t.hyperparameters.into_proto(),
            }),
            priority: f.priority,
            retry_policy: f.retry_policy.map(|r| pb::RetryPolicy {
                max_attempts: r.max_attempts,
                retry_user_errors: r.retry_user_errors,
                initial_backoff: duration(r.initial_backoff),
                max_backoff: duration(r.max_backoff),
                on_oom_killed: match r.on_oom_killed {
                    None => pb::OomKilledAction::Unspecified,
                    Some(OomKilledFile::MoreMemory) => pb::OomKilledAction::MoreMemory,
                    Some(OomKilledFile::Fail) => pb::OomKilledAction::Fail,
                } as i32,
                memory_factor: r.memory_factor,
                max_memory_mib: r.max_memory_mib,
                on_node_fault: match r.on_node_fault {
                    None => pb::NodeFaultAction::Unspecified,
                    Some(NodeFaultFile::OtherRunner) => pb::NodeFaultAction::OtherRunner,
                    Some(NodeFaultFile::Fail) => pb::NodeFaultAction::Fail,
                } as i32,
            }),
            deadline: duration(f.deadline),
            termination_grace: duration(f.termination_grace),
        }
    }
}

/// Parses YAML text; `origin` (usually the file name) prefixes errors.
/// serde_yaml's messages name the field and end with its line and column.
pub fn parse(text: &str, origin: &str) -> anyhow::Result<pb::JobSpec> {
    if text.trim().is_empty() {
        anyhow::bail!("{origin}: the job spec is empty");
    }
    let file: JobSpecFile =
        serde_yaml::from_str(text).map_err(|e| anyhow::anyhow!("{origin}: {e}"))?;
    Ok(file.into())
}

pub fn load(path: &Path) -> anyhow::Result<pb::JobSpec> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read job spec {}: {e}", path.display()))?;
    parse(&text, &path.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
name: full
labels:
  team: research
  tier: 1
image: python:3.11-slim
command: ["python3", "train.py", "--steps", "5"]
env:
  PYTHONUNBUFFERED: 1
  MODE: fast
working_dir: /work
resources:
  gpus: 2
  gpu_type: H100
  cpu: 8.5
  memory_mib: 65536
  shm_mib: 8192
replicas:
  masters: 1
  workers: 3
training:
  algorithm: grpo
  model: llama-3-8b
  dataset_path: /data/ds
  output_path: /out/run1
  hyperparameters:
    learning_rate: 0.0001
    batch_size: 64
    use_lora: true
    scheduler: cosine
priority: 7
retry_policy:
  max_attempts: 3
  retry_user_errors: true
  initial_backoff: 10s
  max_backoff: 5m
  on_oom_killed: more_memory
  memory_factor: 2.0
  max_memory_mib: 262144
  on_node_fault: fail
deadline: 2h
termination_grace: 30s
"#;

    #[test]
    fn full_spec_maps_every_field() {
        let s = parse(FULL, "full.yaml").unwrap();
        assert_eq!(s.name, "full");
        assert_eq!(s.labels["team"], "research");
        assert_eq!(s.labels["tier"], "1");
        assert_eq!(s.image, "python:3.11-slim");
        assert_eq!(s.command, ["python3", "train.py", "--steps", "5"]);
        assert_eq!(s.env["PYTHONUNBUFFERED"], "1");
        assert_eq!(s.env["MODE"], "fast");
        assert_eq!(s.working_dir, "/work");
        let r = s.resources.unwrap();
        assert_eq!(
            (r.gpus, r.gpu_type.as_str(), r.cpu, r.memory_mib, r.shm_mib),
            (2, "H100", 8.5, 65536, 8192)
        );
        let rep = s.replicas.unwrap();
        assert_eq!((rep.masters, rep.workers), (1, 3));
        let t = s.training.unwrap();
        assert_eq!(t.algorithm, pb::TrainingAlgorithm::Grpo as i32);
        assert_eq!(t.model, "llama-3-8b");
        assert_eq!(t.dataset_path, "/data/ds");
        assert_eq!(t.output_path, "/out/run1");
        assert_eq!(t.hyperparameters["learning_rate"], "0.0001");
        assert_eq!(t.hyperparameters["batch_size"], "64");
        assert_eq!(t.hyperparameters["use_lora"], "true");
        assert_eq!(s.priority, 7);
        let rp = s.retry_policy.unwrap();
        assert_eq!(rp.max_attempts, 3);
        assert!(rp.retry_user_errors);
        assert_eq!(rp.initial_backoff.unwrap().seconds, 10);
        assert_eq!(rp.max_backoff.unwrap().seconds, 300);
        assert_eq!(rp.on_oom_killed, pb::OomKilledAction::MoreMemory as i32);
        assert_eq!((rp.memory_factor, rp.max_memory_mib), (2.0, 262_144));
        assert_eq!(rp.on_node_fault, pb::NodeFaultAction::Fail as i32);
        assert_eq!(s.deadline.unwrap().seconds, 7200);
        assert_eq!(s.termination_grace.unwrap().seconds, 30);
    }

    #[test]
    fn minimal_spec_leaves_the_rest_unset() {
        let s = parse("name: x\ncommand: [echo, hi]\n", "m.yaml").unwrap();
        assert_eq!(s.name, "x");
        assert!(s.resources.is_none() && s.training.is_none() && s.deadline.is_none());
        assert!(s.labels.is_empty());
    }

    #[test]
    fn durations_accept_units_and_combinations() {
        let secs = |t: &str| parse_duration(t).unwrap().as_secs_f64();
        assert_eq!(secs("30s"), 30.0);
        assert_eq!(secs("10m"), 600.0);
        assert_eq!(secs("2h"), 7200.0);
        assert_eq!(secs("1h30m"), 5400.0);
        assert_eq!(secs("1d"), 86400.0);
        assert_eq!(secs("250ms"), 0.25);
        assert_eq!(secs("1.5s"), 1.5);
        assert_eq!(secs(" 0s "), 0.0);
    }

    #[test]
    fn durations_without_a_known_unit_are_refused() {
        for bad in ["", "30", "10x", "s", "1h30", "-5s", "1..2s", "99999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be refused");
        }
        assert!(parse_duration("30").unwrap_err().contains("needs a unit"));
    }

    #[test]
    fn bare_number_duration_in_yaml_says_to_add_a_unit() {
        let err = parse("name: x\ndeadline: 30\n", "d.yaml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs a unit"), "{err}");
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn unknown_field_is_named_with_its_line() {
        let err = parse("name: x\ncomand: [echo]\n", "u.yaml")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("u.yaml: "), "{err}");
        assert!(err.contains("unknown field `comand`"), "{err}");
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn unknown_nested_field_is_named_with_its_path() {
        let err = parse("name: x\nresources:\n  gpu: 1\n", "n.yaml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `gpu`"), "{err}");
        assert!(err.contains("resources"), "{err}");
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn bad_algorithm_lists_the_accepted_ones() {
        let err = parse("name: x\ntraining:\n  algorithm: rlhf\n", "a.yaml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("rlhf"), "{err}");
        assert!(err.contains("sft") && err.contains("grpo"), "{err}");
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn command_must_be_a_list_not_a_shell_string() {
        let err = parse("name: x\ncommand: python3 train.py\n", "c.yaml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("command"), "{err}");
        assert!(err.contains("sequence"), "{err}");
    }

    #[test]
    fn nested_map_values_are_refused() {
        let err = parse("name: x\nenv:\n  A: [1, 2]\n", "e.yaml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("a string, number or boolean"), "{err}");
    }

    #[test]
    fn empty_file_is_a_clear_error() {
        let err = parse("  \n", "empty.yaml").unwrap_err().to_string();
        assert!(err.contains("empty"), "{err}");
    }

    #[test]
    fn every_example_job_in_the_repository_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/jobs");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) == Some("yaml") {
                let spec = load(&path).unwrap_or_else(|e| panic!("{e}"));
                assert!(!spec.name.is_empty(), "{}", path.display());
                assert!(!spec.command.is_empty(), "{}", path.display());
            }
        }
    }
}
