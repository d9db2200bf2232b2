//! Names and labels of what the backend creates. Pure functions: the name
//! of an attempt's object is a function of the attempt alone, so that a
//! duplicate assignment finds (and adopts) the object instead of creating
//! a second one.

use std::collections::BTreeMap;

use crate::domain::AttemptKey;

pub const LABEL_JOB: &str = "trainmesh.io/job";
pub const LABEL_ATTEMPT: &str = "trainmesh.io/attempt";
pub const LABEL_OWNER: &str = "trainmesh.io/owner";
pub const LABEL_CORRELATION_ID: &str = "trainmesh.io/correlation-id";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Label values are limited to 63 characters and a small alphabet; the
/// exact owner and correlation id are kept in annotations too.
pub const ANNOTATION_OWNER: &str = "trainmesh.io/owner";
pub const ANNOTATION_CORRELATION_ID: &str = "trainmesh.io/correlation-id";

/// Longest DNS-1123 label (and label value).
const MAX_LABEL: usize = 63;

/// `tm-<job id>-<attempt>`: a DNS-1123 label (lowercase alphanumerics and
/// `-`, starting with a letter so it is also a valid Service name for
/// PyTorchJob's per-replica services), at most 63 characters. A job id is
/// a UUID (36 characters), so the name is at most 50 characters, leaving
/// room for the suffixes Kubernetes adds to pod names.
pub fn object_name(key: &AttemptKey) -> String {
    let job: String = key
        .job_id
        .to_string()
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let suffix = format!("-{}", key.attempt);
    let room = MAX_LABEL - 3 - suffix.len();
    let job: String = job.chars().take(room).collect();
    format!("tm-{}{suffix}", job.trim_matches('-'))
}

/// `value` made a valid label value: characters outside `[A-Za-z0-9._-]`
/// become `_`, at most 63 characters, alphanumeric at both ends (an empty
/// value is valid).
pub fn label_value(value: &str) -> String {
    let mapped: String = value
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(MAX_LABEL)
        .collect();
    mapped
        .trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_owned()
}

/// Whether `key` is a valid label key: an optional DNS subdomain prefix
/// and `/`, then a name of at most 63 characters.
pub fn is_label_key(key: &str) -> bool {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let name_ok = !name.is_empty()
        && name.len() <= MAX_LABEL
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|part| {
                !part.is_empty()
                    && part
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                    && !part.starts_with('-')
                    && !part.ends_with('-')
            })
    });
    name_ok && prefix_ok
}

/// Whether `value` is a valid label value as it is.
pub fn is_label_value(value: &str) -> bool {
    label_value(value) == value
}

/// The labels of the attempt's object and of its pods: the job's own
/// labels that Kubernetes accepts, then the platform's, which win (a job
/// cannot pass for another one). Selecting the pods relies on
/// [`LABEL_JOB`] and [`LABEL_ATTEMPT`].
pub fn labels(
    key: &AttemptKey,
    owner: &str,
    correlation_id: &str,
    job_labels: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = job_labels
        .iter()
        .filter(|(k, v)| is_label_key(k) && is_label_value(v) && !k.starts_with("trainmesh.io/"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    out.insert(LABEL_JOB.into(), label_value(&key.job_id.to_string()));
    out.insert(LABEL_ATTEMPT.into(), key.attempt.to_string());
    out.insert(LABEL_OWNER.into(), label_value(owner));
    out.insert(LABEL_CORRELATION_ID.into(), label_value(correlation_id));
    out.insert(LABEL_MANAGED_BY.into(), "trainmesh".into());
    out
}

/// Selects the pods of one attempt.
pub fn pod_selector(key: &AttemptKey) -> String {
    format!(
        "{LABEL_JOB}={},{LABEL_ATTEMPT}={}",
        label_value(&key.job_id.to_string()),
        key.attempt
    )
}

/// Whether an existing object (found on a name conflict) is this
/// attempt's, so that adopting it cannot take over someone else's.
pub fn is_ours(key: &AttemptKey, labels: Option<&BTreeMap<String, String>>) -> bool {
    let Some(labels) = labels else { return false };
    labels.get(LABEL_JOB).map(String::as_str) == Some(label_value(&key.job_id.to_string()).as_str())
        && labels.get(LABEL_ATTEMPT) == Some(&key.attempt.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::JobId;

    fn key(attempt: i32) -> AttemptKey {
        AttemptKey {
            job_id: JobId::new(),
            attempt,
        }
    }

    fn is_dns1123_label(s: &str) -> bool {
        !s.is_empty()
            && s.len() <= 63
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && s.starts_with(|c: char| c.is_ascii_lowercase())
            && s.ends_with(|c: char| c.is_ascii_alphanumeric())
    }

    #[test]
    fn object_name_is_a_dns_label_and_depends_on_the_attempt_only() {
        let k = key(1);
        let name = object_name(&k);
        assert!(is_dns1123_label(&name), "{name}");
        assert_eq!(name, object_name(&k));
        assert_eq!(name, format!("tm-{}-1", k.job_id));
        let big = object_name(&key(i32::MAX));
        assert!(is_dns1123_label(&big) && big.len() <= 63, "{big}");
        assert_ne!(object_name(&key(2)), object_name(&key(2)));
    }

    #[test]
    fn label_values_are_made_valid() {
        assert_eq!(label_value("alice@example.com"), "alice_example.com");
        assert_eq!(label_value("-x-"), "x");
        assert_eq!(label_value(&"a".repeat(100)).len(), 63);
        assert_eq!(label_value("é"), "");
        assert!(is_label_value(""));
    }

    #[test]
    fn label_keys_follow_kubernetes_rules() {
        assert!(is_label_key("team"));
        assert!(is_label_key("example.com/team"));
        assert!(!is_label_key("Example.com/team"));
        assert!(!is_label_key("-team"));
        assert!(!is_label_key("a/b/c"));
        assert!(!is_label_key(""));
    }

    #[test]
    fn platform_labels_win_and_invalid_job_labels_are_dropped() {
        let k = key(3);
        let job = BTreeMap::from([
            ("team".to_owned(), "nlp".to_owned()),
            ("trainmesh.io/job".to_owned(), "someone-else".to_owned()),
            ("bad key".to_owned(), "x".to_owned()),
            ("ok".to_owned(), "bad value!".to_owned()),
        ]);
        let l = labels(&k, "alice@example.com", "cid-1", &job);
        assert_eq!(l["team"], "nlp");
        assert_eq!(l[LABEL_JOB], k.job_id.to_string());
        assert_eq!(l[LABEL_ATTEMPT], "3");
        assert_eq!(l[LABEL_OWNER], "alice_example.com");
        assert_eq!(l[LABEL_CORRELATION_ID], "cid-1");
        assert!(!l.contains_key("bad key") && !l.contains_key("ok"));
        assert!(is_ours(&k, Some(&l)));
        assert!(!is_ours(&key(3), Some(&l)));
        assert!(!is_ours(&k, None));
    }
}
