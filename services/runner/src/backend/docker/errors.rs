//! What the engine says, turned into the runner's errors and the job's
//! structured errors: engine responses into [`Error`] variants, a
//! container's final state into a [`JobError`].

use bollard::errors::Error as EngineError;
use bollard::models::ContainerState;
use trainmesh_common::proto::job::v1::JobError;

use crate::domain::Termination;
use crate::error::Error;
use crate::job_error::{
    platform_error, setup_error, CATEGORY_IMAGE_PULL, CATEGORY_OOM_KILLED, OOM_KILLED_HINT,
};

/// The engine's error when a device request names a driver it has none
/// for (no nvidia-container-toolkit).
const NO_DEVICE_DRIVER: &str = "could not select device driver";

/// The HTTP status of an engine error response.
pub fn status_of(e: &EngineError) -> Option<u16> {
    match e {
        EngineError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

pub fn is_not_found(e: &EngineError) -> bool {
    status_of(e) == Some(404)
}

pub fn is_conflict(e: &EngineError) -> bool {
    status_of(e) == Some(409)
}

/// The engine's message, without bollard's wrapping.
pub fn message_of(e: &EngineError) -> String {
    match e {
        EngineError::DockerResponseServerError { message, .. } => message.clone(),
        EngineError::DockerStreamError { error } => error.clone(),
        other => other.to_string(),
    }
}

/// Whether a failed pull may succeed when tried again: registry outages,
/// timeouts and rate limits may; a wrong name, a missing tag or missing
/// credentials fail the same way every time.
pub fn pull_is_transient(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    const PERMANENT: [&str; 7] = [
        "not found",
        "manifest unknown",
        "pull access denied",
        "unauthorized",
        "denied",
        "invalid reference format",
        "no such host",
    ];
    const TRANSIENT: [&str; 10] = [
        "timeout",
        "timed out",
        "connection refused",
        "connection reset",
        "toomanyrequests",
        "too many requests",
        "service unavailable",
        "bad gateway",
        "internal server error",
        "temporar",
    ];
    !PERMANENT.iter().any(|p| m.contains(p)) && TRANSIENT.iter().any(|t| m.contains(t))
}

/// A failed pull of `image`.
pub fn pull_failure(image: &str, e: &EngineError) -> Error {
    let reason = message_of(e);
    // A timeout of our own request is transient too.
    let transient = matches!(e, EngineError::RequestTimeoutError) || pull_is_transient(&reason);
    Error::ImagePull {
        image: image.to_owned(),
        reason,
        transient,
    }
}

/// A failed start of `container`.
pub fn start_failure(container: &str, image: &str, e: EngineError) -> Error {
    let message = message_of(&e);
    if message.contains(NO_DEVICE_DRIVER) {
        return Error::NoNvidiaRuntime {
            detail: format!("the engine said: {message}"),
        };
    }
    if status_of(&e).is_none() {
        // Not an answer from the engine: it could not be reached.
        return Error::docker(format!("cannot start container `{container}`"), e);
    }
    Error::ContainerStart {
        container: container.to_owned(),
        image: image.to_owned(),
        message,
    }
}

/// How the container ended, from its state. The engine reports a death by
/// signal n as 128+n, as a shell does; it is read back as the signal so the
/// error names it (the exit code reads the same either way).
pub fn termination(state: &ContainerState) -> Termination {
    let code = state.exit_code.unwrap_or(-1);
    match code {
        129..=192 => Termination::Signaled((code - 128) as i32),
        c => Termination::Exited(i32::try_from(c).unwrap_or(-1)),
    }
}

/// What the engine knows about a failure that the exit code cannot say:
/// its memory limit killed the container, or the runtime failed it.
pub fn failure_of(
    state: &ContainerState,
    image: &str,
    memory_mib: Option<i64>,
) -> Option<JobError> {
    let term = termination(state);
    if term.success() {
        return None;
    }
    if state.oom_killed == Some(true) {
        return Some(container_oom_killed(term, memory_mib));
    }
    match state.error.as_deref().map(str::trim) {
        Some(e) if !e.is_empty() => Some(container_engine_error(image, term, e)),
        _ => None,
    }
}

/// The job's image could not be had. Not retryable unless the failure
/// looked transient (a registry or network hiccup): a wrong name or a
/// missing credential fails the same way every time.
pub fn image_pull_error(image: &str, message: String, transient: bool) -> JobError {
    JobError {
        r#type: "ImagePullError".into(),
        message,
        exit_code: -1,
        category: CATEGORY_IMAGE_PULL.into(),
        retryable: transient,
        hint: format!(
            "check that `{image}` is spelled right (repository and tag), that the runner's \
             Docker engine can reach its registry and is logged in to it, or load the image on \
             the node (docker load) when it has no registry access"
        ),
        ..JobError::default()
    }
}

/// GPUs asked of a Docker engine that cannot give containers GPUs.
pub fn nvidia_runtime_missing(message: String) -> JobError {
    JobError {
        hint: "install nvidia-container-toolkit on the node, run `nvidia-ctk runtime configure \
               --runtime=docker` and restart dockerd; until then this runner should not offer GPUs \
               (--gpus none)"
            .into(),
        ..setup_error("NvidiaRuntimeMissing", message, false)
    }
}

/// The engine created the container but could not start it: mostly a
/// command that is not in the image (the user's to fix), otherwise the
/// node's runtime (retryable elsewhere).
pub fn container_start_error(image: &str, engine_message: &str, message: String) -> JobError {
    let not_found = engine_message.contains("executable file not found")
        || engine_message.contains("no such file or directory");
    if not_found {
        JobError {
            r#type: "ExecError".into(),
            hint: format!(
                "spec.command[0] was not found in image `{image}`: use a path that exists in the \
                 image, or install the program in it"
            ),
            ..setup_error("ExecError", message, false)
        }
    } else {
        platform_error("ContainerStartError", message)
    }
}

/// A container the engine's memory limit killed (`State.OOMKilled`).
pub fn container_oom_killed(term: Termination, memory_mib: Option<i64>) -> JobError {
    let limit = match memory_mib {
        Some(m) if m > 0 => format!(" of {m} MiB"),
        _ => String::new(),
    };
    JobError {
        r#type: "OOMKilled".into(),
        message: format!(
            "the container exceeded its memory limit{limit} and was killed by the \
             out-of-memory killer (exit code {})",
            term.exit_code()
        ),
        exit_code: term.exit_code(),
        signal: term.signal().unwrap_or(0),
        category: CATEGORY_OOM_KILLED.into(),
        retryable: true,
        hint: OOM_KILLED_HINT.into(),
        ..JobError::default()
    }
}

/// The engine's own error for a container that ended (`State.Error`):
/// the runtime failed it, not the job's code.
pub fn container_engine_error(image: &str, term: Termination, engine_message: &str) -> JobError {
    JobError {
        exit_code: term.exit_code(),
        signal: term.signal().unwrap_or(0),
        ..container_start_error(
            image,
            engine_message,
            format!("the Docker engine failed the container: {engine_message}"),
        )
    }
}

#[cfg(test)]
#[path = "errors_tests.rs"]
mod tests;
