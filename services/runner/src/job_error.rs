//! The structured error of a failed attempt, built from how the process
//! ended and what it printed. Pure functions: no I/O, so every rule is unit
//! tested with real log texts.
//!
//! Precedence: a kill by SIGKILL/SIGSEGV/SIGTERM (or the shell's 128+n exit
//! code for them) names the error, then CUDA out-of-memory text, then other
//! signals, then the job's own non-zero exit. A Python traceback in the log,
//! when there is one, supplies type, message and traceback.

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

/// A Python exception found in a log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PythonException {
    /// e.g. `RuntimeError`, `torch.cuda.OutOfMemoryError`.
    pub type_name: String,
    /// The text after `Type: `; empty when the exception had none.
    pub message: String,
    /// From the first `Traceback (most recent call last):` of the final
    /// exception's chain to its exception line, inclusive.
    pub traceback: String,
}

const TRACEBACK_HEADER: &str = "Traceback (most recent call last):";
const CHAIN_MARKERS: [&str; 2] = [
    "During handling of the above exception, another exception occurred:",
    "The above exception was the direct cause of the following exception:",
];

/// Finds the last Python traceback in `log`.
///
/// Lines may carry a common prefix (torchrun writes `[rank0]: `): the
/// prefix in front of the header is stripped from the lines that follow,
/// and lines without it (other ranks) are skipped. A SyntaxError raised
/// for the main script has no header; its `File "…", line N` block is
/// recognised too.
pub fn last_python_traceback(log: &str) -> Option<PythonException> {
    let lines: Vec<&str> = log.lines().collect();
    let header_at = lines.iter().rposition(|l| l.contains(TRACEBACK_HEADER));
    match header_at.and_then(|i| parse_from_header(&lines, i)) {
        // A header-less SyntaxError printed after the last traceback wins.
        Some((exc, end)) => bare_syntax_error(&lines[end + 1..]).or(Some(exc)),
        None => bare_syntax_error(&lines),
    }
}

/// Parses the traceback whose header is `lines[at]`; also returns the
/// index of its exception line.
fn parse_from_header(lines: &[&str], at: usize) -> Option<(PythonException, usize)> {
    let col = lines[at].find(TRACEBACK_HEADER)?;
    let prefix = &lines[at][..col];
    // Lines after the header, prefix stripped; lines without the prefix
    // are interleaved output from another rank or process.
    let rest: Vec<(usize, &str)> = lines
        .iter()
        .enumerate()
        .skip(at + 1)
        .filter_map(|(i, l)| Some((i, l.strip_prefix(prefix)?.trim_end_matches('\r'))))
        .filter(|(_, l)| !l.is_empty())
        .collect();
    let mut body = vec![TRACEBACK_HEADER.to_owned()];
    let mut skipped_other = 0;
    for (i, &(line_no, line)) in rest.iter().enumerate() {
        if line.starts_with(char::is_whitespace) || line.starts_with('^') || line.starts_with('~') {
            body.push(line.to_owned());
            continue;
        }
        if let Some((type_name, message)) = exception_line(line) {
            body.push(line.to_owned());
            // A word-and-colon line such as `INFO: loading` between frames
            // is output, not the exception: frames continue after it.
            let frames_continue = rest
                .get(i + 1)
                .is_some_and(|(_, next)| next.starts_with(char::is_whitespace));
            if !looks_like_exception_type(&type_name) && frames_continue {
                continue;
            }
            let mut traceback = body.join("\n");
            if let Some(earlier) = chained_prefix(lines, at, prefix) {
                traceback = format!("{earlier}\n\n{traceback}");
            }
            let exc = PythonException {
                type_name,
                message,
                traceback,
            };
            return Some((exc, line_no));
        }
        // Unindented noise between frames (a stray print); give up if there
        // is much of it, since then this is not a traceback after all.
        skipped_other += 1;
        if skipped_other > 20 {
            return None;
        }
    }
    None
}

/// When the traceback at `at` follows "During handling of the above
/// exception…" or "The above exception was the direct cause…", returns the
/// earlier part of the chain (from its first header), so the traceback text
/// is the whole chain as Python printed it.
fn chained_prefix(lines: &[&str], at: usize, prefix: &str) -> Option<String> {
    let mut start = at;
    loop {
        let mut i = start;
        // Skip blank lines back to the marker.
        let marker_at = loop {
            if i == 0 {
                break None;
            }
            i -= 1;
            let l = lines[i].strip_prefix(prefix).unwrap_or(lines[i]).trim();
            if l.is_empty() {
                continue;
            }
            break CHAIN_MARKERS.contains(&l).then_some(i);
        };
        let Some(m) = marker_at else { break };
        match lines[..m]
            .iter()
            .rposition(|l| l.contains(TRACEBACK_HEADER))
        {
            Some(h) => start = h,
            None => break,
        }
    }
    if start == at {
        return None;
    }
    let text: Vec<&str> = lines[start..at]
        .iter()
        .map(|l| l.strip_prefix(prefix).unwrap_or(l).trim_end_matches('\r'))
        .collect();
    Some(text.join("\n").trim_end().to_owned())
}

fn looks_like_exception_type(type_name: &str) -> bool {
    let short = type_name.rsplit('.').next().unwrap_or(type_name);
    [
        "Error",
        "Exception",
        "Interrupt",
        "Exit",
        "Iteration",
        "Warning",
        "Failure",
        "Fault",
    ]
    .iter()
    .any(|s| short.ends_with(s))
}

/// `Type: message`, `pkg.mod.Type: message` or a bare `Type`.
fn exception_line(line: &str) -> Option<(String, String)> {
    let (type_name, message) = match line.split_once(':') {
        Some((t, m)) => (t, m.strip_prefix(' ').unwrap_or(m)),
        None => (line.trim_end(), ""),
    };
    let valid = !type_name.is_empty()
        && type_name.split('.').all(|part| {
            let mut chars = part.chars();
            chars
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        });
    // A bare word is only an exception line if it looks like one, so that a
    // stray `Done` is not taken for an exception type.
    let bare_ok = !line.contains(':') && looks_like_exception_type(type_name);
    (valid && (line.contains(':') || bare_ok)).then(|| (type_name.to_owned(), message.to_owned()))
}

/// A SyntaxError (or IndentationError/TabError) of the main script, which
/// Python prints without a `Traceback` header.
fn bare_syntax_error(lines: &[&str]) -> Option<PythonException> {
    let end = lines.iter().rposition(|l| {
        exception_line(l.trim_end_matches('\r')).is_some_and(|(t, _)| {
            t.ends_with("SyntaxError") || t.ends_with("IndentationError") || t.ends_with("TabError")
        })
    })?;
    let mut start = end;
    while start > 0 {
        let prev = lines[start - 1];
        if prev.starts_with(char::is_whitespace) && !prev.trim().is_empty() {
            start -= 1;
        } else {
            break;
        }
    }
    if start == end || !lines[start].trim_start().starts_with("File \"") {
        return None;
    }
    let (type_name, message) = exception_line(lines[end].trim_end_matches('\r'))?;
    let traceback = lines[start..=end]
        .iter()
        .map(|l| l.trim_end_matches('\r'))
        .collect::<Vec<_>>()
        .join("\n");
    Some(PythonException {
        type_name,
        message,
        traceback,
    })
}

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
