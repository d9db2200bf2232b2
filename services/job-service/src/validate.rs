//! What job-service checks on top of the shared spec validation
//! ([`trainmesh_common::spec`]): that users do not set platform labels, and
//! its path policy for dataset and output paths.

use trainmesh_common::error::FieldError;
use trainmesh_common::proto::job::v1 as pb;
pub use trainmesh_common::spec::ValidSpec;
use trainmesh_common::text::{max_len, no_control};

use crate::domain::RESERVED_LABEL_PREFIX;
use crate::paths::{PathKind, PathPolicy};

pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 256;
pub const MAX_REASON_BYTES: usize = 4096;

/// Validates a user's spec: the shared checks, then labels and paths.
/// Dataset/output paths are resolved under `paths` (without creating
/// anything). Platform labels are refused unless `allow_reserved_labels`.
pub fn validate_spec(
    spec: Option<pb::JobSpec>,
    paths: &PathPolicy,
    allow_reserved_labels: bool,
) -> Result<ValidSpec, FieldError> {
    let spec = spec.ok_or_else(|| FieldError::new("spec", "is required"))?;
    let valid = trainmesh_common::spec::validate(spec)?;
    if !allow_reserved_labels {
        let mut keys: Vec<&String> = valid.get().labels.keys().collect();
        keys.sort();
        if let Some(k) = keys.iter().find(|k| k.starts_with(RESERVED_LABEL_PREFIX)) {
            return Err(FieldError::new(
                format!("spec.labels[\"{k}\"]"),
                format!(
                    "keys starting with `{RESERVED_LABEL_PREFIX}` are reserved for the platform"
                ),
            ));
        }
    }
    let Some(t) = valid.get().training.as_ref() else {
        return Ok(valid);
    };
    let resolve = |field: &str, path: &str, kind| -> Result<String, FieldError> {
        if path.is_empty() {
            return Ok(String::new());
        }
        Ok(paths.check(field, path, kind)?.display().to_string())
    };
    let dataset = resolve(
        "spec.training.dataset_path",
        &t.dataset_path,
        PathKind::Input,
    )?;
    let output = resolve(
        "spec.training.output_path",
        &t.output_path,
        PathKind::Output,
    )?;
    Ok(valid.map_unchecked(|s| {
        if let Some(t) = s.training.as_mut() {
            t.dataset_path = dataset;
            t.output_path = output;
        }
    }))
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

    #[test]
    fn users_may_not_set_platform_labels() {
        let mut s = base();
        s.labels.insert("trainmesh.io/retry-of".into(), "x".into());
        let err = validate_spec(Some(s.clone()), &PathPolicy::default(), false).unwrap_err();
        assert_eq!(err.field, "spec.labels[\"trainmesh.io/retry-of\"]");
        validate_spec(Some(s), &PathPolicy::default(), true).unwrap();
        assert_eq!(
            validate_spec(None, &PathPolicy::default(), false)
                .unwrap_err()
                .field,
            "spec"
        );
    }
}
