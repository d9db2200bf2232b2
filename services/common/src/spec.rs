//! The one validation of a job spec.
//!
//! job-service (at CreateJob), the scheduler (at EnqueueJob) and the runner
//! (at each assignment) all turn a `pb::JobSpec` into a [`ValidSpec`] here,
//! so a spec one of them accepts is never refused by another: a job cannot
//! be accepted and then wait forever for a queue that will not take it.
//! Every limit is in [`limits`]; the README lists them. Paths are checked
//! on top of this by job-service's path policy, against its file system.

use std::collections::HashMap;
use std::time::Duration;

use crate::error::FieldError;
use crate::proto::job::v1 as pb;
use crate::text::{display_text, max_len, no_control, no_nul};

/// Every limit on a job spec.
pub mod limits {
    use std::time::Duration;

    pub const MAX_NAME_BYTES: usize = 253;
    /// Labels a user sets; the platform may add [`MAX_PLATFORM_LABELS`]
    /// of its own (prefixed [`super::PLATFORM_LABEL_PREFIX`]) on top.
    pub const MAX_LABELS: usize = 64;
    pub const MAX_PLATFORM_LABELS: usize = 8;
    pub const MAX_LABEL_KEY_BYTES: usize = 253;
    pub const MAX_LABEL_VALUE_BYTES: usize = 256;
    pub const MAX_IMAGE_BYTES: usize = 1024;
    pub const MAX_ARGS: usize = 4096;
    pub const MAX_ENV: usize = 1024;
    pub const MAX_SECRET_ENV: usize = 64;
    pub const MAX_SECRET_NAME_BYTES: usize = 253;
    pub const MAX_HYPERPARAMETERS: usize = 1024;
    /// One argument, env value or hyperparameter.
    pub const MAX_VALUE_BYTES: usize = 64 * 1024;
    pub const MAX_PATH_BYTES: usize = 4096;
    pub const MAX_GPU_TYPE_BYTES: usize = 128;
    /// GPUs of one replica, and of the whole job over its replicas.
    pub const MAX_GPUS: u32 = 4096;
    /// CPUs of one replica.
    pub const MAX_CPUS: f64 = 100_000.0;
    /// Memory (and shared memory) of one replica: 64 TiB.
    pub const MAX_MEMORY_MIB: i64 = 64 * 1024 * 1024;
    /// Every job has one master; "0" means one.
    pub const MAX_MASTERS: i32 = 1;
    pub const MAX_WORKERS: i32 = 1024;
    pub const MIN_PRIORITY: i32 = -1000;
    pub const MAX_PRIORITY: i32 = 1000;
    /// Attempts in total; 0 means the scheduler's default.
    pub const MAX_ATTEMPTS: i32 = 100;
    /// `retry_policy.memory_factor`: how much more memory a retry after an
    /// out-of-memory kill gets (0 means [`DEFAULT_MEMORY_FACTOR`]).
    pub const MIN_MEMORY_FACTOR: f64 = 1.1;
    pub const MAX_MEMORY_FACTOR: f64 = 4.0;
    pub const DEFAULT_MEMORY_FACTOR: f64 = 1.5;
    pub const MAX_BACKOFF: Duration = Duration::from_secs(24 * 3600);
    pub const MAX_DEADLINE: Duration = Duration::from_secs(366 * 24 * 3600);
    pub const MAX_TERMINATION_GRACE: Duration = Duration::from_secs(3600);
}

use limits::*;

/// Label key prefix reserved for labels the platform sets itself.
pub const PLATFORM_LABEL_PREFIX: &str = "trainmesh.io/";

/// What a job needs, summed over its replicas (which all run on one
/// runner in this release).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Shape {
    /// GPUs over every replica; at most [`MAX_GPUS`].
    pub gpus: u32,
    /// Case-insensitive substring of the GPU model, trimmed; empty: any.
    pub gpu_type: String,
    /// Per replica.
    pub cpu_milli: i64,
    pub memory_mib: i64,
    /// Replicas besides the master.
    pub workers: u32,
}

impl Shape {
    /// Master and workers.
    pub fn replicas(&self) -> i64 {
        1 + i64::from(self.workers)
    }
}

/// The spec's durations, range-checked; `None` when unset (or zero, which
/// protobuf cannot tell from unset).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Timing {
    /// `None`: the scheduler's default.
    pub max_attempts: Option<u32>,
    pub initial_backoff: Option<Duration>,
    pub max_backoff: Option<Duration>,
    pub deadline: Option<Duration>,
    pub termination_grace: Option<Duration>,
}

/// A `pb::JobSpec` that passed [`validate`], with the values every service
/// derives from it.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidSpec {
    spec: pb::JobSpec,
    pub shape: Shape,
    pub timing: Timing,
}

impl ValidSpec {
    pub fn get(&self) -> &pb::JobSpec {
        &self.spec
    }

    pub fn into_inner(self) -> pb::JobSpec {
        self.spec
    }

    /// Changes the spec in ways that cannot make it invalid: `f` may only
    /// touch labels and training paths, which the callers check themselves.
    pub fn map_unchecked(mut self, f: impl FnOnce(&mut pb::JobSpec)) -> Self {
        f(&mut self.spec);
        self
    }
}

fn fe(field: impl Into<String>, why: impl Into<String>) -> FieldError {
    FieldError::new(field, why)
}

fn sorted<V>(m: &HashMap<String, V>) -> Vec<(&String, &V)> {
    let mut v: Vec<_> = m.iter().collect();
    v.sort_by(|a, b| a.0.cmp(b.0));
    v
}

/// `[A-Za-z_][A-Za-z0-9_]*`.
pub fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A label key: non-empty, bounded, visible, no whitespace, no `=` or `,`
/// (which would make `key=value` selectors ambiguous).
pub fn check_label_key(field: &str, key: &str) -> Result<(), FieldError> {
    if key.is_empty() {
        return Err(fe(field, "label keys must not be empty"));
    }
    display_text(field, key, MAX_LABEL_KEY_BYTES)?;
    if key
        .chars()
        .any(|c| c.is_whitespace() || c == '=' || c == ',')
    {
        return Err(fe(
            field,
            "label keys must not contain whitespace, `=` or `,`",
        ));
    }
    Ok(())
}

/// A label value: bounded, visible.
pub fn check_label_value(field: &str, value: &str) -> Result<(), FieldError> {
    display_text(field, value, MAX_LABEL_VALUE_BYTES)
}

/// A protobuf duration in `0..=max`, normalised (nanos within a second and
/// not negative). Zero is `None`.
pub fn duration(
    field: &str,
    d: Option<&prost_types::Duration>,
    max: Duration,
) -> Result<Option<Duration>, FieldError> {
    let Some(d) = d else { return Ok(None) };
    if d.seconds < 0 || d.nanos < 0 {
        return Err(fe(field, "must not be negative"));
    }
    if d.nanos >= 1_000_000_000 {
        return Err(fe(field, "nanos must be below 1000000000"));
    }
    let value = Duration::new(d.seconds as u64, d.nanos as u32);
    if value > max {
        return Err(fe(field, format!("must be at most {}s", max.as_secs())));
    }
    Ok((!value.is_zero()).then_some(value))
}

/// Checks every field of `spec` against [`limits`]. Platform labels are
/// accepted here; job-service refuses them from users on top of this.
pub fn validate(spec: pb::JobSpec) -> Result<ValidSpec, FieldError> {
    display_text("spec.name", &spec.name, MAX_NAME_BYTES)?;
    labels(&spec.labels)?;
    image(&spec.image)?;
    command(&spec.command)?;
    env(&spec.env)?;
    secret_env(&spec.secret_env, &spec.env)?;
    secret_env_keys(&spec.secret_env_keys, &spec.env)?;
    max_len("spec.working_dir", &spec.working_dir, MAX_PATH_BYTES)?;
    no_nul("spec.working_dir", &spec.working_dir)?;
    let shape = shape(&spec)?;
    if let Some(t) = &spec.training {
        training(t)?;
    }
    if !(MIN_PRIORITY..=MAX_PRIORITY).contains(&spec.priority) {
        return Err(fe(
            "spec.priority",
            format!("must be between {MIN_PRIORITY} and {MAX_PRIORITY}"),
        ));
    }
    let timing = timing(&spec)?;
    Ok(ValidSpec {
        spec,
        shape,
        timing,
    })
}

fn labels(labels: &HashMap<String, String>) -> Result<(), FieldError> {
    let platform = labels
        .keys()
        .filter(|k| k.starts_with(PLATFORM_LABEL_PREFIX))
        .count();
    if labels.len() - platform > MAX_LABELS || platform > MAX_PLATFORM_LABELS {
        return Err(fe(
            "spec.labels",
            format!("at most {MAX_LABELS} labels are allowed"),
        ));
    }
    for (k, v) in sorted(labels) {
        let field = format!("spec.labels[\"{}\"]", k.escape_debug());
        check_label_key(&field, k)?;
        check_label_value(&field, v)?;
    }
    Ok(())
}

fn image(image: &str) -> Result<(), FieldError> {
    if image.trim().is_empty() {
        return Err(fe("spec.image", "is required"));
    }
    display_text("spec.image", image, MAX_IMAGE_BYTES)?;
    if image.chars().any(char::is_whitespace) {
        return Err(fe("spec.image", "must not contain whitespace"));
    }
    Ok(())
}

fn command(command: &[String]) -> Result<(), FieldError> {
    let Some(program) = command.first() else {
        return Err(fe(
            "spec.command",
            "is required (argv; never run by a shell)",
        ));
    };
    if program.is_empty() {
        return Err(fe("spec.command[0]", "the program must not be empty"));
    }
    if command.len() > MAX_ARGS {
        return Err(fe(
            "spec.command",
            format!("at most {MAX_ARGS} arguments are allowed"),
        ));
    }
    for (i, arg) in command.iter().enumerate() {
        let field = format!("spec.command[{i}]");
        no_nul(&field, arg)?;
        max_len(&field, arg, MAX_VALUE_BYTES)?;
    }
    Ok(())
}

fn env(env: &HashMap<String, String>) -> Result<(), FieldError> {
    if env.len() > MAX_ENV {
        return Err(fe(
            "spec.env",
            format!("at most {MAX_ENV} variables are allowed"),
        ));
    }
    for (k, v) in sorted(env) {
        let field = format!("spec.env[\"{}\"]", k.escape_debug());
        if !is_env_name(k) {
            return Err(fe(field, "names must match [A-Za-z_][A-Za-z0-9_]*"));
        }
        if k.to_ascii_uppercase().starts_with("TRAINMESH_") {
            return Err(fe(
                field,
                "names starting with `TRAINMESH_` are set by the platform",
            ));
        }
        no_nul(&field, v)?;
        max_len(&field, v, MAX_VALUE_BYTES)?;
    }
    Ok(())
}

/// Each names a variable of `env`, once; a sealed value is only where it is
/// listed (anywhere else it would reach the job sealed).
fn secret_env_keys(keys: &[String], env: &HashMap<String, String>) -> Result<(), FieldError> {
    if keys.len() > MAX_SECRET_ENV {
        return Err(fe(
            "spec.secret_env_keys",
            format!("at most {MAX_SECRET_ENV} variables are allowed"),
        ));
    }
    for (i, k) in keys.iter().enumerate() {
        let field = format!("spec.secret_env_keys[{i}]");
        if !env.contains_key(k) {
            return Err(fe(
                field,
                format!("`{}` is not set in spec.env", k.escape_debug()),
            ));
        }
        if keys[..i].contains(k) {
            return Err(fe(field, format!("`{k}` is listed twice")));
        }
    }
    for (k, v) in sorted(env) {
        if crate::sealed::is_sealed(v) && !keys.contains(k) {
            return Err(fe(
                format!("spec.env[\"{}\"]", k.escape_debug()),
                "holds a sealed value but is not listed in spec.secret_env_keys",
            ));
        }
    }
    Ok(())
}

/// Variable names as in `env`, and not also there; secret names are file
/// names and Kubernetes Secret keys (`[A-Za-z0-9._-]`, not `.` or `..`).
fn secret_env(
    secrets: &HashMap<String, String>,
    env: &HashMap<String, String>,
) -> Result<(), FieldError> {
    if secrets.len() > MAX_SECRET_ENV {
        return Err(fe(
            "spec.secret_env",
            format!("at most {MAX_SECRET_ENV} variables are allowed"),
        ));
    }
    for (k, secret) in sorted(secrets) {
        let field = format!("spec.secret_env[\"{}\"]", k.escape_debug());
        if !is_env_name(k) || k.to_ascii_uppercase().starts_with("TRAINMESH_") {
            return Err(fe(
                field,
                "names must match [A-Za-z_][A-Za-z0-9_]* and not start with `TRAINMESH_`",
            ));
        }
        if env.contains_key(k) {
            return Err(fe(field, "is also set in spec.env"));
        }
        let name_ok = !secret.is_empty()
            && secret.len() <= MAX_SECRET_NAME_BYTES
            && secret != "."
            && secret != ".."
            && secret
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !name_ok {
            return Err(fe(
                field,
                format!(
                    "the secret's name must be 1-{MAX_SECRET_NAME_BYTES} of [A-Za-z0-9._-] \
                     (not `.` or `..`)"
                ),
            ));
        }
    }
    Ok(())
}

fn shape(spec: &pb::JobSpec) -> Result<Shape, FieldError> {
    let r = spec.resources.clone().unwrap_or_default();
    let gpus_per_replica = u32::try_from(r.gpus)
        .ok()
        .filter(|g| *g <= MAX_GPUS)
        .ok_or_else(|| {
            fe(
                "spec.resources.gpus",
                format!("must be between 0 and {MAX_GPUS}"),
            )
        })?;
    if !r.cpu.is_finite() || !(0.0..=MAX_CPUS).contains(&r.cpu) {
        return Err(fe(
            "spec.resources.cpu",
            format!("must be a number between 0 and {MAX_CPUS}"),
        ));
    }
    for (field, v) in [
        ("spec.resources.memory_mib", r.memory_mib),
        ("spec.resources.shm_mib", r.shm_mib),
    ] {
        if !(0..=MAX_MEMORY_MIB).contains(&v) {
            return Err(fe(
                field,
                format!("must be between 0 and {MAX_MEMORY_MIB} (64 TiB)"),
            ));
        }
    }
    display_text("spec.resources.gpu_type", &r.gpu_type, MAX_GPU_TYPE_BYTES)?;
    let replicas = spec.replicas.unwrap_or_default();
    if !(0..=MAX_MASTERS).contains(&replicas.masters) {
        return Err(fe(
            "spec.replicas.masters",
            "must be 0 or 1: every job has one master",
        ));
    }
    let workers = u32::try_from(replicas.workers)
        .ok()
        .filter(|w| i64::from(*w) <= i64::from(MAX_WORKERS))
        .ok_or_else(|| {
            fe(
                "spec.replicas.workers",
                format!("must be between 0 and {MAX_WORKERS}"),
            )
        })?;
    let total = u64::from(gpus_per_replica) * (1 + u64::from(workers));
    if total > u64::from(MAX_GPUS) {
        return Err(fe(
            "spec.resources.gpus",
            format!(
                "{total} GPUs over {} replicas is more than the {MAX_GPUS} a job may use",
                1 + workers
            ),
        ));
    }
    Ok(Shape {
        gpus: total as u32,
        gpu_type: r.gpu_type.trim().to_owned(),
        // Bounded above, so the product and its sums cannot overflow.
        cpu_milli: (r.cpu * 1000.0).round() as i64,
        memory_mib: r.memory_mib,
        workers,
    })
}

fn training(t: &pb::Training) -> Result<(), FieldError> {
    if pb::TrainingAlgorithm::try_from(t.algorithm).is_err() {
        return Err(fe(
            "spec.training.algorithm",
            format!("{} is not a known training algorithm", t.algorithm),
        ));
    }
    max_len("spec.training.model", &t.model, MAX_PATH_BYTES)?;
    no_control("spec.training.model", &t.model)?;
    if t.hyperparameters.len() > MAX_HYPERPARAMETERS {
        return Err(fe(
            "spec.training.hyperparameters",
            format!("at most {MAX_HYPERPARAMETERS} are allowed"),
        ));
    }
    for (k, v) in sorted(&t.hyperparameters) {
        let field = format!("spec.training.hyperparameters[\"{}\"]", k.escape_debug());
        if k.is_empty() {
            return Err(fe(field, "keys must not be empty"));
        }
        display_text(&field, k, MAX_LABEL_KEY_BYTES)?;
        no_nul(&field, v)?;
        max_len(&field, v, MAX_VALUE_BYTES)?;
    }
    for (field, p) in [
        ("spec.training.dataset_path", &t.dataset_path),
        ("spec.training.output_path", &t.output_path),
    ] {
        max_len(field, p, MAX_PATH_BYTES)?;
        no_nul(field, p)?;
    }
    Ok(())
}

fn timing(spec: &pb::JobSpec) -> Result<Timing, FieldError> {
    let mut t = Timing::default();
    if let Some(rp) = &spec.retry_policy {
        if !(0..=MAX_ATTEMPTS).contains(&rp.max_attempts) {
            return Err(fe(
                "spec.retry_policy.max_attempts",
                format!("must be between 0 (the default) and {MAX_ATTEMPTS}"),
            ));
        }
        t.max_attempts = (rp.max_attempts > 0).then_some(rp.max_attempts as u32);
        t.initial_backoff = duration(
            "spec.retry_policy.initial_backoff",
            rp.initial_backoff.as_ref(),
            MAX_BACKOFF,
        )?;
        t.max_backoff = duration(
            "spec.retry_policy.max_backoff",
            rp.max_backoff.as_ref(),
            MAX_BACKOFF,
        )?;
        if let (Some(initial), Some(max)) = (t.initial_backoff, t.max_backoff) {
            if initial > max {
                return Err(fe(
                    "spec.retry_policy.initial_backoff",
                    "must not be longer than max_backoff",
                ));
            }
        }
        recovery(rp, spec.resources.as_ref().map_or(0, |r| r.memory_mib))?;
    }
    t.deadline = duration("spec.deadline", spec.deadline.as_ref(), MAX_DEADLINE)?;
    t.termination_grace = duration(
        "spec.termination_grace",
        spec.termination_grace.as_ref(),
        MAX_TERMINATION_GRACE,
    )?;
    Ok(t)
}

/// What the retry policy says to do after an out-of-memory kill or a node
/// fault. `memory_mib` is the request per replica (already range-checked).
fn recovery(rp: &pb::RetryPolicy, memory_mib: i64) -> Result<(), FieldError> {
    if pb::OomKilledAction::try_from(rp.on_oom_killed).is_err() {
        return Err(fe(
            "spec.retry_policy.on_oom_killed",
            format!("{} is not MORE_MEMORY or FAIL", rp.on_oom_killed),
        ));
    }
    if pb::NodeFaultAction::try_from(rp.on_node_fault).is_err() {
        return Err(fe(
            "spec.retry_policy.on_node_fault",
            format!("{} is not OTHER_RUNNER or FAIL", rp.on_node_fault),
        ));
    }
    let f = rp.memory_factor;
    if f != 0.0 && !(f.is_finite() && (MIN_MEMORY_FACTOR..=MAX_MEMORY_FACTOR).contains(&f)) {
        return Err(fe(
            "spec.retry_policy.memory_factor",
            format!(
                "must be between {MIN_MEMORY_FACTOR:.1} and {MAX_MEMORY_FACTOR:.1} \
                 (0 means {DEFAULT_MEMORY_FACTOR:.1})"
            ),
        ));
    }
    let max = rp.max_memory_mib;
    if !(0..=MAX_MEMORY_MIB).contains(&max) {
        return Err(fe(
            "spec.retry_policy.max_memory_mib",
            format!("must be between 0 (4 × resources.memory_mib) and {MAX_MEMORY_MIB} (64 TiB)"),
        ));
    }
    if max != 0 && max < memory_mib {
        return Err(fe(
            "spec.retry_policy.max_memory_mib",
            format!("must not be less than spec.resources.memory_mib ({memory_mib})"),
        ));
    }
    Ok(())
}

#[cfg(test)]
#[path = "spec_tests.rs"]
mod tests;
