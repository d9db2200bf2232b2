//! The structured error of an attempt that failed on Kubernetes, from the
//! [`Cause`] the pod states gave. Where the job's own code failed, the
//! failing pod's log is classified like any log (traceback, CUDA OOM), with
//! Kubernetes' word (OOMKilled, which pod) on top.

use std::time::Duration;

use trainmesh_common::proto::job::v1::JobError;

use super::verdict::Cause;
use crate::domain::Termination;
use crate::job_error;

pub const CATEGORY_IMAGE_PULL: &str = "image-pull";
pub const CATEGORY_UNSCHEDULABLE: &str = "unschedulable";

const IMAGE_PULL_HINT: &str = "check the image name and tag, that the image exists in the \
registry, and that the runner's image pull secrets (--k8s-image-pull-secret) grant access to it";
const UNSCHEDULABLE_HINT: &str = "no node of the cluster can take the pod: request fewer GPUs \
or less memory per replica, fewer workers, or wait for capacity; check node taints and quotas";
const CONFIG_HINT: &str = "a secret, config map or volume the pod needs is missing or invalid: \
check the namespace the runner creates jobs in (--k8s-namespace)";
const OOM_HINT: &str = "the container used more memory than its limit: raise \
spec.resources.memory_mib, or lower the batch size or the number of data-loader workers";

/// `the master` / `worker 2` of the job, and its pod.
fn whose(pod: &str, role: &impl std::fmt::Display) -> String {
    format!("{role} (pod `{pod}`)")
}

/// The error for `cause`. `log` is the failing pod's output (for a
/// traceback); `deadline` the attempt's, if it had one.
pub fn job_error(
    cause: &Cause,
    term: Termination,
    log: &str,
    deadline: Option<Duration>,
) -> JobError {
    match cause {
        Cause::OomKilled {
            pod,
            role,
            container,
            exit_code,
        } => {
            // The log may hold the trace of what was allocating.
            let mut e = job_error::classify(Termination::Exited(137), log).unwrap_or_default();
            e.r#type = "OOMKilled".into();
            e.message = format!(
                "container `{container}` of the {} was killed for exceeding its memory limit \
                 (OOMKilled, exit code {exit_code})",
                whose(pod, role)
            );
            e.exit_code = *exit_code;
            e.category = job_error::CATEGORY_OOM_KILLED.into();
            e.retryable = true;
            e.hint = OOM_HINT.into();
            e
        }
        Cause::UserCode {
            pod,
            role,
            exit_code,
            ..
        } => {
            // classify names what the exit code and log say (a traceback,
            // a segfault, CUDA OOM); the pod says where it happened.
            let mut e =
                job_error::classify(Termination::Exited(*exit_code), log).unwrap_or_else(|| {
                    JobError {
                        r#type: "NonZeroExit".into(),
                        message: format!("exited with code {exit_code}"),
                        exit_code: *exit_code,
                        category: job_error::CATEGORY_USER_CODE.into(),
                        ..JobError::default()
                    }
                });
            e.message = format!("{} [in the {}]", e.message, whose(pod, role));
            e
        }
        Cause::ImagePull {
            pod,
            container,
            image,
            reason,
            message,
        } => JobError {
            r#type: reason.clone(),
            message: format!(
                "cannot pull image `{image}` for container `{container}` of pod `{pod}`: {message}"
            ),
            exit_code: -1,
            category: CATEGORY_IMAGE_PULL.into(),
            retryable: false,
            hint: IMAGE_PULL_HINT.into(),
            ..JobError::default()
        },
        Cause::Unschedulable {
            pod,
            message,
            waited,
        } => JobError {
            r#type: "Unschedulable".into(),
            message: format!(
                "pod `{pod}` could not be scheduled for {}s: {message}",
                waited.as_secs()
            ),
            exit_code: -1,
            category: CATEGORY_UNSCHEDULABLE.into(),
            // Capacity comes and goes: another attempt may fit.
            retryable: true,
            hint: UNSCHEDULABLE_HINT.into(),
            ..JobError::default()
        },
        Cause::ContainerConfig {
            pod,
            container,
            reason,
            message,
        } => JobError {
            r#type: reason.clone(),
            message: format!("container `{container}` of pod `{pod}` cannot start: {message}"),
            exit_code: -1,
            category: job_error::CATEGORY_SETUP.into(),
            retryable: false,
            hint: CONFIG_HINT.into(),
            ..JobError::default()
        },
        Cause::Preempted {
            pod,
            role,
            disruption: d,
        } => job_error::preempted_error(
            d.kind.as_str(),
            format!(
                "the {} was {} by Kubernetes{}",
                whose(pod, role),
                d.kind.past(),
                d.detail()
            ),
            term,
        ),
        Cause::PodFailed {
            pod,
            reason,
            message,
        } => {
            let ty = if reason.is_empty() {
                "PodFailed"
            } else {
                reason
            };
            job_error::platform_error(ty, format!("pod `{pod}` failed: {reason} {message}"))
        }
        Cause::Deadline { message } => {
            let mut e = job_error::deadline_error(deadline.unwrap_or_default(), term);
            if !message.is_empty() {
                e.message = format!("{} ({message})", e.message);
            }
            e
        }
        Cause::JobFailed { reason, message } => job_error::platform_error(
            "KubernetesJobFailed",
            format!("the job failed on Kubernetes: {reason}: {message}"),
        ),
    }
}
