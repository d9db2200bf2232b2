//! JobSpec validation: every user mistake becomes a [`FieldError`] naming
//! the field (`spec.resources.gpus`, `spec.env["TRAINMESH_X"]`, …).

use trainmesh_common::error::FieldError;
use trainmesh_common::proto::job::v1 as pb;

use crate::domain::RESERVED_LABEL_PREFIX;
use crate::paths::{PathKind, PathPolicy};

pub const MAX_NAME_BYTES: usize = 253;
pub const MAX_LABELS: usize = 64;
pub const MAX_LABEL_KEY_BYTES: usize = 253;
pub const MAX_LABEL_VALUE_BYTES: usize = 256;
pub const MAX_IMAGE_BYTES: usize = 1024;
pub const MAX_ARGS: usize = 4096;
pub const MAX_ENV: usize = 1024;
pub const MAX_VALUE_BYTES: usize = 64 * 1024;
pub const MIN_PRIORITY: i32 = -1000;
pub const MAX_PRIORITY: i32 = 1000;
pub const MAX_ATTEMPTS: i32 = 100;
pub const MAX_REPLICAS: i32 = 10_000;
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 256;
pub const MAX_REASON_BYTES: usize = 4096;

/// A JobSpec that passed [`validate_spec`]; its paths are canonical.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidSpec(pb::JobSpec);

impl ValidSpec {
    pub fn get(&self) -> &pb::JobSpec {
        &self.0
    }

    pub fn into_inner(self) -> pb::JobSpec {
        self.0
    }

    /// Adds a platform label (callers have already validated the spec).
    pub fn with_platform_label(mut self, key: &str, value: &str) -> Self {
        self.0.labels.insert(key.to_owned(), value.to_owned());
        self
    }
}

fn fe(field: impl Into<String>, why: impl Into<String>) -> FieldError {
    FieldError::new(field, why)
}

fn no_control(field: &str, s: &str) -> Result<(), FieldError> {
    if s.chars().any(|c| c.is_control()) {
        return Err(fe(field, "must not contain control characters"));
    }
    Ok(())
}

fn max_len(field: &str, s: &str, max: usize) -> Result<(), FieldError> {
    if s.len() > max {
        return Err(fe(
            field,
            format!("is {} bytes; at most {max} are allowed", s.len()),
        ));
    }
    Ok(())
}

fn non_negative_duration(field: &str, d: &Option<prost_types::Duration>) -> Result<(), FieldError> {
    match d {
        Some(d) if trainmesh_common::time::from_duration(d).is_none() => {
            Err(fe(field, "must not be negative"))
        }
        _ => Ok(()),
    }
}

/// A label key: non-empty, bounded, no whitespace, no `=` or `,` (which
/// would make `key=value` selectors ambiguous).
pub fn check_label_key(field: &str, key: &str) -> Result<(), FieldError> {
    if key.is_empty() {
        return Err(fe(field, "label keys must not be empty"));
    }
    max_len(field, key, MAX_LABEL_KEY_BYTES)?;
    if key
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '=' || c == ',')
    {
        return Err(fe(
            field,
            "label keys must not contain whitespace, `=` or `,`",
        ));
    }
    Ok(())
}

/// `[A-Za-z_][A-Za-z0-9_]*`.
pub fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn sorted<V>(m: &std::collections::HashMap<String, V>) -> Vec<(&String, &V)> {
    let mut v: Vec<_> = m.iter().collect();
    v.sort_by(|a, b| a.0.cmp(b.0));
    v
}

/// Checks every field of `spec`; resolves dataset/output paths under
/// `paths` (without creating anything). Labels with the platform prefix
/// are refused unless `allow_reserved_labels`.
pub fn validate_spec(
    spec: Option<pb::JobSpec>,
    paths: &PathPolicy,
    allow_reserved_labels: bool,
) -> Result<ValidSpec, FieldError> {
    let mut spec = spec.ok_or_else(|| fe("spec", "is required"))?;

    max_len("spec.name", &spec.name, MAX_NAME_BYTES)?;
    no_control("spec.name", &spec.name)?;

    if spec.labels.len() > MAX_LABELS {
        return Err(fe(
            "spec.labels",
            format!("at most {MAX_LABELS} labels are allowed"),
        ));
    }
    for (k, v) in sorted(&spec.labels) {
        let field = format!("spec.labels[\"{k}\"]");
        check_label_key(&field, k)?;
        if !allow_reserved_labels && k.starts_with(RESERVED_LABEL_PREFIX) {
            return Err(fe(
                field,
                format!(
                    "keys starting with `{RESERVED_LABEL_PREFIX}` are reserved for the platform"
                ),
            ));
        }
        max_len(&field, v, MAX_LABEL_VALUE_BYTES)?;
        no_control(&field, v)?;
    }

    if spec.image.trim().is_empty() {
        return Err(fe("spec.image", "is required"));
    }
    max_len("spec.image", &spec.image, MAX_IMAGE_BYTES)?;
    if spec
        .image
        .chars()
        .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(fe("spec.image", "must not contain whitespace"));
    }

    if spec.command.is_empty() {
        return Err(fe(
            "spec.command",
            "is required (argv; never run by a shell)",
        ));
    }
    if spec.command[0].is_empty() {
        return Err(fe("spec.command[0]", "the program must not be empty"));
    }
    if spec.command.len() > MAX_ARGS {
        return Err(fe(
            "spec.command",
            format!("at most {MAX_ARGS} arguments are allowed"),
        ));
    }
    for (i, arg) in spec.command.iter().enumerate() {
        let field = format!("spec.command[{i}]");
        if arg.contains('\0') {
            return Err(fe(field, "must not contain NUL bytes"));
        }
        max_len(&field, arg, MAX_VALUE_BYTES)?;
    }

    if spec.env.len() > MAX_ENV {
        return Err(fe(
            "spec.env",
            format!("at most {MAX_ENV} variables are allowed"),
        ));
    }
    for (k, v) in sorted(&spec.env) {
        let field = format!("spec.env[\"{k}\"]");
        if !is_env_name(k) {
            return Err(fe(field, "names must match [A-Za-z_][A-Za-z0-9_]*"));
        }
        if k.to_ascii_uppercase().starts_with("TRAINMESH_") {
            return Err(fe(
                field,
                "names starting with `TRAINMESH_` are set by the platform",
            ));
        }
        if v.contains('\0') {
            return Err(fe(field, "must not contain NUL bytes"));
        }
        max_len(&field, v, MAX_VALUE_BYTES)?;
    }

    max_len("spec.working_dir", &spec.working_dir, 4096)?;
    if spec.working_dir.contains('\0') {
        return Err(fe("spec.working_dir", "must not contain NUL bytes"));
    }

    if let Some(r) = &spec.resources {
        if r.gpus < 0 {
            return Err(fe("spec.resources.gpus", "must not be negative"));
        }
        if !r.cpu.is_finite() || r.cpu < 0.0 {
            return Err(fe("spec.resources.cpu", "must be a non-negative number"));
        }
        if r.memory_mib < 0 {
            return Err(fe("spec.resources.memory_mib", "must not be negative"));
        }
        if r.shm_mib < 0 {
            return Err(fe("spec.resources.shm_mib", "must not be negative"));
        }
        max_len("spec.resources.gpu_type", &r.gpu_type, 128)?;
        no_control("spec.resources.gpu_type", &r.gpu_type)?;
    }

    if let Some(r) = &spec.replicas {
        for (field, n) in [
            ("spec.replicas.masters", r.masters),
            ("spec.replicas.workers", r.workers),
        ] {
            if !(0..=MAX_REPLICAS).contains(&n) {
                return Err(fe(field, format!("must be between 0 and {MAX_REPLICAS}")));
            }
        }
    }

    if let Some(t) = &mut spec.training {
        if pb::TrainingAlgorithm::try_from(t.algorithm).is_err() {
            return Err(fe(
                "spec.training.algorithm",
                format!("{} is not a known training algorithm", t.algorithm),
            ));
        }
        max_len("spec.training.model", &t.model, 4096)?;
        no_control("spec.training.model", &t.model)?;
        for (k, v) in sorted(&t.hyperparameters) {
            let field = format!("spec.training.hyperparameters[\"{k}\"]");
            if k.is_empty() {
                return Err(fe(field, "keys must not be empty"));
            }
            max_len(&field, k, MAX_LABEL_KEY_BYTES)?;
            max_len(&field, v, MAX_VALUE_BYTES)?;
        }
        if !t.dataset_path.is_empty() {
            let p = paths.check(
                "spec.training.dataset_path",
                &t.dataset_path,
                PathKind::Input,
            )?;
            t.dataset_path = p.display().to_string();
        }
        if !t.output_path.is_empty() {
            let p = paths.check(
                "spec.training.output_path",
                &t.output_path,
                PathKind::Output,
            )?;
            t.output_path = p.display().to_string();
        }
    }

    if !(MIN_PRIORITY..=MAX_PRIORITY).contains(&spec.priority) {
        return Err(fe(
            "spec.priority",
            format!("must be between {MIN_PRIORITY} and {MAX_PRIORITY}"),
        ));
    }

    if let Some(rp) = &spec.retry_policy {
        if !(0..=MAX_ATTEMPTS).contains(&rp.max_attempts) {
            return Err(fe(
                "spec.retry_policy.max_attempts",
                format!("must be between 0 and {MAX_ATTEMPTS}"),
            ));
        }
        non_negative_duration("spec.retry_policy.initial_backoff", &rp.initial_backoff)?;
        non_negative_duration("spec.retry_policy.max_backoff", &rp.max_backoff)?;
    }
    non_negative_duration("spec.deadline", &spec.deadline)?;
    non_negative_duration("spec.termination_grace", &spec.termination_grace)?;

    Ok(ValidSpec(spec))
}

/// An optional idempotency key: bounded, printable.
pub fn validate_idempotency_key(key: &str) -> Result<Option<String>, FieldError> {
    if key.is_empty() {
        return Ok(None);
    }
    max_len("idempotency_key", key, MAX_IDEMPOTENCY_KEY_BYTES)?;
    no_control("idempotency_key", key)?;
    Ok(Some(key.to_owned()))
}

/// A free-text reason (cancel, status): bounded and storable (no NUL).
pub fn validate_reason(field: &str, reason: &str) -> Result<String, FieldError> {
    max_len(field, reason, MAX_REASON_BYTES)?;
    Ok(reason.replace('\0', "\u{fffd}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> pb::JobSpec {
        pb::JobSpec {
            image: "python:3.12".into(),
            command: vec!["python".into(), "train.py".into()],
            ..Default::default()
        }
    }

    fn field_of(spec: pb::JobSpec) -> String {
        validate_spec(Some(spec), &PathPolicy::default(), false)
            .unwrap_err()
            .field
    }

    #[test]
    fn a_minimal_spec_is_valid() {
        validate_spec(Some(base()), &PathPolicy::default(), false).unwrap();
    }

    #[test]
    fn each_mistake_names_its_field() {
        let mut s = base();
        s.image.clear();
        assert_eq!(field_of(s), "spec.image");
        let mut s = base();
        s.command.clear();
        assert_eq!(field_of(s), "spec.command");
        let mut s = base();
        s.command[0].clear();
        assert_eq!(field_of(s), "spec.command[0]");
        let mut s = base();
        s.resources = Some(pb::Resources {
            cpu: -1.0,
            ..Default::default()
        });
        assert_eq!(field_of(s), "spec.resources.cpu");
        let mut s = base();
        s.priority = 1001;
        assert_eq!(field_of(s), "spec.priority");
        let mut s = base();
        s.training = Some(pb::Training {
            algorithm: 42,
            ..Default::default()
        });
        assert_eq!(field_of(s), "spec.training.algorithm");
        let mut s = base();
        s.env.insert("1BAD".into(), "x".into());
        assert_eq!(field_of(s), "spec.env[\"1BAD\"]");
        let mut s = base();
        s.env.insert("TRAINMESH_JOB_ID".into(), "x".into());
        assert_eq!(field_of(s), "spec.env[\"TRAINMESH_JOB_ID\"]");
        let mut s = base();
        s.labels.insert("".into(), "x".into());
        assert_eq!(field_of(s), "spec.labels[\"\"]");
        let mut s = base();
        s.deadline = Some(prost_types::Duration {
            seconds: -1,
            nanos: 0,
        });
        assert_eq!(field_of(s), "spec.deadline");
        let mut s = base();
        s.name = "x".repeat(254);
        assert_eq!(field_of(s), "spec.name");
        assert_eq!(
            validate_spec(None, &PathPolicy::default(), false)
                .unwrap_err()
                .field,
            "spec"
        );
    }

    #[test]
    fn env_names() {
        assert!(is_env_name("_A1"));
        assert!(is_env_name("PATH"));
        assert!(!is_env_name(""));
        assert!(!is_env_name("A-B"));
        assert!(!is_env_name("9A"));
    }
}
