//! The structured error of a failed attempt, built from how the process
//! ended and what it printed. Pure functions: no I/O, so every rule is unit
//! tested with real log texts.
//!
//! Precedence: a kill by SIGKILL/SIGSEGV/SIGTERM (or the shell's 128+n exit
//! code for them) names the error, then CUDA out-of-memory text, then a
//! node fault (the node could not run GPU work: [`node_fault_in`]), then
//! other signals, then the job's own non-zero exit. A Python traceback in
//! the log, when there is one, supplies type, message and traceback.
//!
//! A node fault is read from the log alone; [`judge_node_fault`] then
//! weighs it against what the attempt was given (no GPUs: the job's own
//! mistake), since the scheduler moves the job off the runner and counts
//! the fault against it.

use trainmesh_common::proto::job::v1::JobError;

use crate::domain::Termination;

pub const CATEGORY_USER_CODE: &str = "user-code";
pub const CATEGORY_OOM_KILLED: &str = "oom-killed";
pub const CATEGORY_CUDA_OOM: &str = "cuda-oom";
pub const CATEGORY_SEGFAULT: &str = "segfault";
pub const CATEGORY_TERMINATED: &str = "terminated";
pub const CATEGORY_SIGNAL: &str = "signal";
pub const CATEGORY_SETUP: &str = "setup";
pub const CATEGORY_DEADLINE: &str = "deadline";
pub const CATEGORY_RUNNER_SHUTDOWN: &str = "runner-shutdown";
/// The scheduler's category for an attempt whose runner lost its lease.
pub const CATEGORY_RUNNER_LOST: &str = "runner-lost";
pub const CATEGORY_PLATFORM: &str = "platform";
pub const CATEGORY_IMAGE_PULL: &str = "image-pull";
pub const CATEGORY_PREEMPTED: &str = "preempted";
/// The node could not run GPU work (no GPU visible, driver or Xid/ECC
/// errors); the error is marked `node_fault`.
pub const CATEGORY_GPU_UNAVAILABLE: &str = "gpu-unavailable";

pub(crate) const OOM_KILLED_HINT: &str = "the process was killed with SIGKILL, most likely by the \
out-of-memory killer: raise spec.resources.memory_mib, or lower the batch size or the number \
of data-loader workers";
const CUDA_OOM_HINT: &str = "the GPU ran out of memory: reduce the batch size (use gradient \
accumulation to keep the effective batch), enable gradient checkpointing or mixed precision \
(bf16/fp16), shorten the sequence length, or request GPUs with more memory";
const SEGFAULT_HINT: &str = "a native library crashed (segmentation fault): check that the \
CUDA driver, CUDA runtime and PyTorch versions match and that custom extensions were built \
for them; set PYTHONFAULTHANDLER=1 to print the Python stack at the crash";
const SIGTERM_HINT: &str = "the process was stopped with SIGTERM (cancelled, preempted, or \
stopped by its environment); make the job save checkpoints so a retry can resume";
const PREEMPTED_HINT: &str = "the platform took the attempt's resources back (preempted or \
evicted): the attempt is retried at once and does not use the job's retry budget; save \
checkpoints so a retry resumes. If it keeps happening, ask for a higher priority class or \
request fewer resources";

#[path = "job_error_traceback.rs"]
mod traceback;
pub use traceback::{last_python_traceback, PythonException};

/// True when `text` reports a GPU out-of-memory error.
/// Other libraries have an `OutOfMemoryError` too (Ray's is the host's
/// memory), so only PyTorch's and the CUDA messages count.
pub fn is_cuda_oom(text: &str) -> bool {
    text.contains("CUDA out of memory")
        || text.contains("torch.cuda.OutOfMemoryError")
        || text.contains("torch.OutOfMemoryError")
        || text.contains("CUDA error: out of memory")
        || text.contains("HIP out of memory")
}

/// What the CUDA runtime, the driver or NVML print when the node cannot
/// run GPU work: no device visible to a job that was given some, a driver
/// that is missing or does not match, a device that is busy, broken or
/// gone. Phrases of the job's own bugs (illegal memory access, device-side
/// asserts) are left out: they follow the job to any node.
const GPU_UNAVAILABLE: [&str; 9] = [
    "No CUDA GPUs are available",
    "no CUDA-capable device is detected",
    "CUDA-capable device(s) is/are busy or unavailable",
    "Found no NVIDIA driver on your system",
    "CUDA driver version is insufficient for CUDA runtime version",
    "Driver/library version mismatch",
    "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver",
    "Unexpected error from cudaGetDeviceCount()",
    "system has unsupported display driver / cuda driver combination",
];

/// Hardware failures the driver reports in the kernel log (which some
/// nodes forward to the job's output) or through CUDA, whatever the job's
/// own exception says.
const GPU_BROKEN: [&str; 4] = [
    "NVRM: Xid",
    "GPU has fallen off the bus",
    "uncorrectable ECC error encountered",
    "CUDA_ERROR_ECC_UNCORRECTABLE",
];

/// Which node fault a log shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeFault {
    /// A GPU phrase (from [`GPU_UNAVAILABLE`] or [`GPU_BROKEN`]).
    Gpu(&'static str),
    /// NCCL's "unhandled system error": the node's fault only when every
    /// rank ran on it (see [`judge_node_fault`]).
    NcclSystem,
}

/// The node fault in a failed attempt's output: `exception` is the final
/// Python exception's type and message when there is one (so an earlier
/// warning such as "No CUDA GPUs are available, using the CPU" does not
/// count), else `None` and the whole log is read. Hardware failures count
/// wherever they appear.
pub fn node_fault_in(exception: Option<&str>, log: &str) -> Option<NodeFault> {
    if let Some(p) = GPU_BROKEN.iter().find(|p| log.contains(*p)) {
        return Some(NodeFault::Gpu(p));
    }
    let text = exception.unwrap_or(log);
    if let Some(p) = GPU_UNAVAILABLE.iter().find(|p| text.contains(*p)) {
        return Some(NodeFault::Gpu(p));
    }
    let nccl_system = text.contains("ncclSystemError")
        || (text.contains("NCCL") && text.contains("unhandled system error"));
    nccl_system.then_some(NodeFault::NcclSystem)
}

const GPU_UNAVAILABLE_HINT: &str = "the node could not run GPU work (no GPU visible, a driver \
error, or a failing GPU): the scheduler runs the job again on another runner and counts the \
fault against this one; an admin should check the node (`nvidia-smi`, Xid errors in `dmesg`)";

/// What an attempt was given, for judging a node fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttemptFacts {
    /// GPUs the spec asks for, per replica.
    pub gpus: i32,
    /// Every replica ran on this node.
    pub single_node: bool,
}

/// Keeps a node fault only where the node is to blame: a job given no GPU
/// that finds none, or whose NCCL fails across several nodes, has a fault
/// of its own (or of the network) that would follow it to any runner.
pub fn judge_node_fault(mut err: JobError, facts: AttemptFacts) -> JobError {
    if !err.node_fault {
        return err;
    }
    let nccl = err.message.contains("NCCL") || err.r#type.contains("DistBackendError");
    let hint = if facts.gpus <= 0 {
        "the job asks for no GPUs (spec.resources.gpus is 0) but uses CUDA: request GPUs, or \
         make it run on the CPU"
    } else if nccl && !facts.single_node {
        "NCCL failed between the job's nodes: check the network between them (NCCL_DEBUG=INFO \
         shows where)"
    } else {
        return err;
    };
    err.node_fault = false;
    err.retryable = false;
    err.category = if err.signal != 0 || err.exit_code >= 128 {
        CATEGORY_SIGNAL
    } else {
        CATEGORY_USER_CODE
    }
    .into();
    err.hint = hint.into();
    err
}

fn last_non_empty_line(log: &str) -> Option<&str> {
    log.lines().rev().map(str::trim).find(|l| !l.is_empty())
}

fn signal_name(sig: i32) -> String {
    nix::sys::signal::Signal::try_from(sig)
        .map(|s| s.as_str().to_owned())
        .unwrap_or_else(|_| format!("signal {sig}"))
}

fn hint_for_type(type_name: &str) -> &'static str {
    let short = type_name.rsplit('.').next().unwrap_or(type_name);
    match short {
        "ModuleNotFoundError" | "ImportError" => {
            "a module is missing: install it in the image or environment the job runs in"
        }
        "FileNotFoundError" => {
            "a file was not found: check dataset and output paths and the job's working_dir"
        }
        "KeyboardInterrupt" => "the job received SIGINT",
        _ => "",
    }
}

/// The structured error for an attempt that ended with `term` after
/// printing `log` (the tail of its output); `None` for a clean exit.
pub fn classify(term: Termination, log: &str) -> Option<JobError> {
    let code = term.exit_code();
    if code == 0 {
        return None;
    }
    let signal = term.signal().unwrap_or(0);
    let tb = last_python_traceback(log);
    let cuda_oom = match &tb {
        Some(t) => is_cuda_oom(&t.type_name) || is_cuda_oom(&t.message),
        None => is_cuda_oom(log),
    };
    let exception = tb
        .as_ref()
        .map(|t| format!("{}: {}", t.type_name, t.message));
    let node_fault = node_fault_in(exception.as_deref(), log);
    let (tb_type, tb_message, traceback) = match tb {
        Some(t) => (Some(t.type_name), Some(t.message), t.traceback),
        None => (None, None, String::new()),
    };
    let mut err = JobError {
        exit_code: code,
        signal,
        traceback,
        ..JobError::default()
    };
    let with =
        |err: &mut JobError, ty: &str, msg: String, category: &str, retryable, hint: &str| {
            err.r#type = tb_type.clone().unwrap_or_else(|| ty.to_owned());
            err.message = tb_message.clone().unwrap_or(msg);
            err.category = category.to_owned();
            err.retryable = retryable;
            err.hint = hint.to_owned();
        };
    match code {
        137 => with(
            &mut err,
            "OOMKilled",
            "process was killed by SIGKILL (exit code 137), usually by the out-of-memory killer"
                .into(),
            CATEGORY_OOM_KILLED,
            true,
            OOM_KILLED_HINT,
        ),
        139 => with(
            &mut err,
            "Segfault",
            "process crashed with a segmentation fault (SIGSEGV, exit code 139)".into(),
            CATEGORY_SEGFAULT,
            true,
            SEGFAULT_HINT,
        ),
        143 => with(
            &mut err,
            "SIGTERM",
            "process was terminated by SIGTERM (exit code 143)".into(),
            CATEGORY_TERMINATED,
            true,
            SIGTERM_HINT,
        ),
        _ if cuda_oom => with(
            &mut err,
            "CudaOutOfMemory",
            "CUDA out of memory".into(),
            CATEGORY_CUDA_OOM,
            false,
            CUDA_OOM_HINT,
        ),
        _ if node_fault.is_some() => {
            let what = match node_fault {
                Some(NodeFault::Gpu(phrase)) => phrase.to_owned(),
                _ => "NCCL unhandled system error".to_owned(),
            };
            with(
                &mut err,
                "GpuUnavailable",
                format!("the node could not run GPU work: {what} (exit code {code})"),
                CATEGORY_GPU_UNAVAILABLE,
                true,
                GPU_UNAVAILABLE_HINT,
            );
            err.node_fault = true;
        }
        _ if signal != 0 => with(
            &mut err,
            "Signal",
            format!(
                "process was killed by {} (exit code {code})",
                signal_name(signal)
            ),
            CATEGORY_SIGNAL,
            true,
            "",
        ),
        _ => {
            let mut msg = format!("process exited with code {code}");
            if let Some(last) = last_non_empty_line(log) {
                msg.push_str(": ");
                msg.push_str(last);
            }
            let hint = tb_type.as_deref().map(hint_for_type).unwrap_or("");
            with(
                &mut err,
                "NonZeroExit",
                msg,
                CATEGORY_USER_CODE,
                false,
                hint,
            )
        }
    }
    Some(err)
}

/// The error of an attempt the process backend killed for holding more
/// than its memory limit: an out-of-memory kill, as a container's cgroup
/// would have made it.
pub fn memory_limit_error(limit_mib: i64, used_mib: u64) -> JobError {
    JobError {
        r#type: "OOMKilled".into(),
        message: format!(
            "the attempt's processes used {used_mib} MiB, more than its memory limit of \
             {limit_mib} MiB (spec.resources.memory_mib), and were killed with SIGKILL"
        ),
        exit_code: 137,
        signal: libc::SIGKILL,
        category: CATEGORY_OOM_KILLED.into(),
        retryable: true,
        hint: OOM_KILLED_HINT.into(),
        ..JobError::default()
    }
}

/// The error of a command that could not be started at all.
pub fn exec_error(program: &str, source: &std::io::Error) -> JobError {
    let hint = match source.kind() {
        std::io::ErrorKind::NotFound => format!(
            "`{program}` was not found: check spec.command[0] and that it is installed on the \
             runner's PATH"
        ),
        std::io::ErrorKind::PermissionDenied => {
            format!("`{program}` is not executable by the runner's user: check its permissions")
        }
        _ => String::new(),
    };
    JobError {
        r#type: "ExecError".into(),
        message: format!("cannot execute `{program}`: {source}"),
        exit_code: -1,
        category: CATEGORY_SETUP.into(),
        retryable: false,
        hint,
        ..JobError::default()
    }
}

/// Any other failure to prepare an attempt (bad working directory, a GPU the
/// runner does not have, an invalid assignment).
pub fn setup_error(type_name: &str, message: String, retryable: bool) -> JobError {
    JobError {
        r#type: type_name.into(),
        message,
        exit_code: -1,
        category: CATEGORY_SETUP.into(),
        retryable,
        ..JobError::default()
    }
}

/// A failure of the runner or node rather than of the job (retryable
/// elsewhere).
pub fn platform_error(type_name: &str, message: String) -> JobError {
    JobError {
        r#type: type_name.into(),
        message,
        exit_code: -1,
        category: CATEGORY_PLATFORM.into(),
        retryable: true,
        ..JobError::default()
    }
}

/// An attempt whose resources the platform took back (a pod preempted or
/// evicted, its node shut down). `term` is kept as the backend saw it:
/// the exit code is only how the container was stopped, and the category,
/// not the code, tells the scheduler not to count the attempt.
pub fn preempted_error(type_name: &str, message: String, term: Termination) -> JobError {
    JobError {
        r#type: type_name.into(),
        message,
        exit_code: term.exit_code(),
        signal: term.signal().unwrap_or(0),
        category: CATEGORY_PREEMPTED.into(),
        retryable: true,
        hint: PREEMPTED_HINT.into(),
        ..JobError::default()
    }
}

/// The error of an attempt stopped because it ran past `spec.deadline`.
pub fn deadline_error(deadline: std::time::Duration, term: Termination) -> JobError {
    JobError {
        r#type: "DeadlineExceeded".into(),
        message: format!(
            "attempt ran past its deadline of {}s and was stopped",
            deadline.as_secs_f64()
        ),
        exit_code: term.exit_code(),
        signal: term.signal().unwrap_or(0),
        category: CATEGORY_DEADLINE.into(),
        retryable: false,
        hint: "raise spec.deadline, or make the job save checkpoints and resume from them".into(),
        ..JobError::default()
    }
}

/// The error of an attempt its runner handed back because the runner was
/// stopped (`term`: how it was stopped; `None` when it never started).
/// The category tells the scheduler to run it again at once without
/// counting it against the job's attempts.
pub fn handed_back_error(term: Option<Termination>) -> JobError {
    JobError {
        r#type: "RunnerShutdown".into(),
        message: "the runner running this attempt was stopped and handed the attempt back".into(),
        exit_code: term.map_or(-1, Termination::exit_code),
        signal: term.and_then(Termination::signal).unwrap_or(0),
        category: CATEGORY_RUNNER_SHUTDOWN.into(),
        retryable: true,
        hint: "the attempt runs again at once and does not use one of the job's attempts; \
               nothing is wrong with the job"
            .into(),
        ..JobError::default()
    }
}

/// The error of an attempt its runner stopped because the runner lost its
/// lease (`term`: how it was stopped; `None` when it never started). The
/// category is the one the scheduler gives an attempt whose runner's lease
/// expired, so the attempt is treated the same whichever side noticed
/// first; by the time this arrives the scheduler has mostly refused it.
pub fn lease_lost_error(term: Option<Termination>) -> JobError {
    JobError {
        r#type: "RunnerLeaseLost".into(),
        message: "the runner could not renew its lease with the scheduler and stopped the \
                  attempt, which the scheduler runs again elsewhere"
            .into(),
        exit_code: term.map_or(-1, Termination::exit_code),
        signal: term.and_then(Termination::signal).unwrap_or(0),
        category: CATEGORY_RUNNER_LOST.into(),
        retryable: true,
        hint: "the runner was cut off from the scheduler; nothing is wrong with the job, and \
               checkpoints let the retry resume"
            .into(),
        ..JobError::default()
    }
}

#[cfg(test)]
#[path = "job_error_tests.rs"]
mod tests;
