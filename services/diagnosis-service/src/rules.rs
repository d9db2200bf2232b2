//! The rule set: ordered data, not code. Each rule names what it matches
//! (log regexes, exit codes, error types and categories, failure causes, a
//! spec check) and what to say (category, summary, hint). A rule matches
//! when any of its conditions does. Extra rules can be loaded from YAML
//! (`--rules-file`); they are tried before the built-in ones, and one with
//! the id of a built-in rule replaces it in place.
//!
//! ```yaml
//! rules:
//!   - id: hf-hub-offline
//!     layer: execution          # resource | control | execution
//!     severity: error           # error (default) | warning
//!     category: network
//!     summary: Hugging Face Hub unreachable
//!     hint: Mount the model locally or set HF_HUB_OFFLINE=1 with a warm cache.
//!     log_patterns: ["We couldn't connect to 'https://huggingface.co'"]
//!     exit_codes: []
//!     error_types: []
//!     error_categories: []
//!     failure_causes: []        # user-code, setup, image-pull, platform, deadline, signal, …
//! ```

use std::collections::HashSet;

use regex::Regex;
use serde::Deserialize;
use trainmesh_common::proto::job::v1 as jpb;

use crate::domain::{Evidence, Finding, JobFacts, Layer, LogLine, Severity};

/// Log lines cited per finding: the first few and the last few matches.
const MAX_LOG_EVIDENCE: usize = 5;

/// A rule as written (in code or YAML).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    pub id: String,
    pub layer: Layer,
    #[serde(default)]
    pub severity: Severity,
    pub category: String,
    /// May use `{error}` (the job error's `Type: message`) and `{exit_code}`.
    pub summary: String,
    pub hint: String,
    /// Regexes (case-insensitive) over each log line and the job's error text.
    #[serde(default)]
    pub log_patterns: Vec<String>,
    #[serde(default)]
    pub exit_codes: Vec<i32>,
    /// The error's type, with or without its module (`OutOfMemoryError`
    /// matches `torch.OutOfMemoryError`).
    #[serde(default)]
    pub error_types: Vec<String>,
    #[serde(default)]
    pub error_categories: Vec<String>,
    #[serde(default)]
    pub failure_causes: Vec<String>,
    /// Spec check: the job asks for GPUs with less shared memory than this.
    #[serde(default)]
    pub gpu_shm_below_mib: Option<i64>,
    /// Matches a failed job that no earlier error rule explained.
    #[serde(default)]
    pub fallback: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    rules: Vec<RuleSpec>,
}

#[derive(Debug)]
struct Rule {
    spec: RuleSpec,
    patterns: Vec<Regex>,
}

impl Rule {
    fn compile(spec: RuleSpec) -> anyhow::Result<Self> {
        if spec.id.trim().is_empty() {
            anyhow::bail!("a rule has an empty id");
        }
        let patterns = spec
            .log_patterns
            .iter()
            .map(|p| {
                Regex::new(&format!("(?i){p}"))
                    .map_err(|e| anyhow::anyhow!("rule `{}`: bad pattern `{p}`: {e}", spec.id))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self { spec, patterns })
    }
}

/// Kebab-case name of a failure cause, as rules name it.
pub fn cause_name(c: jpb::FailureCause) -> &'static str {
    match c {
        jpb::FailureCause::Unspecified => "",
        jpb::FailureCause::UserCode => "user-code",
        jpb::FailureCause::Setup => "setup",
        jpb::FailureCause::NoCapacity => "no-capacity",
        jpb::FailureCause::Platform => "platform",
        jpb::FailureCause::ApprovalExpired => "approval-expired",
        jpb::FailureCause::Deadline => "deadline",
        jpb::FailureCause::ImagePull => "image-pull",
        jpb::FailureCause::Signal => "signal",
        jpb::FailureCause::Cancelled => "cancelled",
        jpb::FailureCause::Preempted => "preempted",
        jpb::FailureCause::Refused => "refused",
    }
}

fn type_matches(actual: &str, wanted: &str) -> bool {
    let actual = actual.trim();
    actual.eq_ignore_ascii_case(wanted)
        || actual
            .rsplit_once('.')
            .is_some_and(|(_, last)| last.eq_ignore_ascii_case(wanted))
}

/// The ordered rules.
#[derive(Debug)]
pub struct RuleSet {
    rules: Vec<Rule>,
}

impl RuleSet {
    pub fn builtin() -> Self {
        Self::with_extra(Vec::new()).expect("built-in rules compile")
    }

    /// `extra` first, replacing built-in rules with the same id in place.
    pub fn with_extra(extra: Vec<RuleSpec>) -> anyhow::Result<Self> {
        let mut specs = builtin_specs();
        let mut front = Vec::new();
        let mut ids = HashSet::new();
        for s in extra {
            if !ids.insert(s.id.clone()) {
                anyhow::bail!("rule `{}` is defined twice", s.id);
            }
            match specs.iter_mut().find(|b| b.id == s.id) {
                Some(b) => *b = s,
                None => front.push(s),
            }
        }
        front.extend(specs);
        let rules = front
            .into_iter()
            .map(Rule::compile)
            .collect::<anyhow::Result<_>>()?;
        Ok(Self { rules })
    }

    /// Parses a rules file (see the module docs).
    pub fn parse_yaml(text: &str) -> anyhow::Result<Vec<RuleSpec>> {
        let file: RulesFile = serde_yaml::from_str(text)?;
        Ok(file.rules)
    }

    pub fn load_file(path: &std::path::Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read rules file {}: {e}", path.display()))?;
        let extra = Self::parse_yaml(&text)
            .map_err(|e| anyhow::anyhow!("rules file {}: {e}", path.display()))?;
        Self::with_extra(extra).map_err(|e| anyhow::anyhow!("rules file {}: {e}", path.display()))
    }

    pub fn ids(&self) -> Vec<&str> {
        self.rules.iter().map(|r| r.spec.id.as_str()).collect()
    }

    /// Findings in rule order, errors before warnings.
    pub fn evaluate(&self, job: &JobFacts, log: &[LogLine]) -> Vec<Finding> {
        let mut findings: Vec<Finding> = Vec::new();
        for rule in &self.rules {
            let explained = findings.iter().any(|f| f.severity == Severity::Error);
            if let Some(f) = apply(rule, job, log, explained) {
                findings.push(f);
            }
        }
        // Stable: rule order within each severity.
        findings.sort_by_key(|f| f.severity == Severity::Warning);
        findings
    }
}

fn apply(rule: &Rule, job: &JobFacts, log: &[LogLine], explained: bool) -> Option<Finding> {
    let s = &rule.spec;
    let mut evidence: Vec<Evidence> = Vec::new();
    let error = job.error.as_ref();
    let headline = error.map(|e| e.headline()).unwrap_or_default();
    let mut cite_error = false;

    if let Some(code) = job.exit_code.filter(|c| s.exit_codes.contains(c)) {
        evidence.push(Evidence::error(format!("exit code {code}")));
    }
    if let Some(e) = error {
        if s.error_types.iter().any(|t| type_matches(&e.kind, t))
            || s.error_categories.contains(&e.category)
        {
            cite_error = true;
        }
    }
    let cause = cause_name(job.failure_cause);
    if !cause.is_empty() && s.failure_causes.iter().any(|c| c == cause) {
        let reason = if job.state_reason.is_empty() {
            String::new()
        } else {
            format!(": {}", job.state_reason)
        };
        evidence.push(Evidence::error(format!("failure cause {cause}{reason}")));
    }
    if !rule.patterns.is_empty() {
        let hits: Vec<&LogLine> = log
            .iter()
            .filter(|l| rule.patterns.iter().any(|p| p.is_match(&l.text)))
            .collect();
        let cited: Vec<&&LogLine> = if hits.len() > MAX_LOG_EVIDENCE {
            let head = MAX_LOG_EVIDENCE - 2;
            hits[..head].iter().chain(&hits[hits.len() - 2..]).collect()
        } else {
            hits.iter().collect()
        };
        evidence.extend(cited.into_iter().map(|l| Evidence::log(l)));
        if let Some(e) = error {
            let text = e.text();
            if rule.patterns.iter().any(|p| p.is_match(&text)) {
                cite_error = true;
            }
        }
    }
    if let Some(min) = s.gpu_shm_below_mib {
        if job.gpus > 0 && job.shm_mib < min {
            evidence.push(Evidence::spec(format!(
                "resources.gpus = {}, resources.shm_mib = {} (container default when 0)",
                job.gpus, job.shm_mib
            )));
        }
    }
    let fallback = s.fallback && !explained && job.state == jpb::JobState::Failed;
    if fallback {
        cite_error = true;
        if error.is_none() {
            if let Some(code) = job.exit_code {
                evidence.push(Evidence::error(format!("exit code {code}")));
            }
            if !job.state_reason.is_empty() {
                evidence.push(Evidence::error(job.state_reason.clone()));
            }
        }
    }
    if cite_error && !headline.is_empty() {
        evidence.insert(0, Evidence::error(headline.clone()));
    }
    if evidence.is_empty() && !fallback {
        return None;
    }
    let mut seen = HashSet::new();
    evidence.retain(|e| seen.insert(e.clone()));
    let exit = job.exit_code.map(|c| c.to_string()).unwrap_or_default();
    let error_text = if headline.is_empty() {
        match job.exit_code {
            Some(c) => format!("exit code {c}"),
            None => "an unknown error".to_owned(),
        }
    } else {
        headline
    };
    // The fallback keeps the runner's classification when it made one.
    let category = match error {
        Some(e) if fallback && !e.category.is_empty() => e.category.clone(),
        _ => s.category.clone(),
    };
    Some(Finding {
        rule_id: s.id.clone(),
        layer: s.layer,
        severity: s.severity,
        category,
        summary: s
            .summary
            .replace("{error}", &error_text)
            .replace("{exit_code}", &exit),
        hint: s.hint.clone(),
        evidence,
    })
}

fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

fn rule(id: &str, layer: Layer, category: &str, summary: &str, hint: &str) -> RuleSpec {
    RuleSpec {
        id: id.into(),
        layer,
        severity: Severity::Error,
        category: category.into(),
        summary: summary.into(),
        hint: hint.into(),
        log_patterns: Vec::new(),
        exit_codes: Vec::new(),
        error_types: Vec::new(),
        error_categories: Vec::new(),
        failure_causes: Vec::new(),
        gpu_shm_below_mib: None,
        fallback: false,
    }
}

/// The built-in rules, most specific root causes first: a CUDA OOM on one
/// rank shows up as NCCL timeouts on the others, so cuda-oom precedes nccl.
pub fn builtin_specs() -> Vec<RuleSpec> {
    use Layer::{Control, Execution, Resource};
    vec![
        // First: when the platform took the resources back, the log's last
        // words (a SIGTERM, a SIGKILL) are how the job was stopped, not why.
        RuleSpec {
            error_categories: strs(&["preempted"]),
            failure_causes: strs(&["preempted"]),
            ..rule(
                "preempted",
                Control,
                "preempted",
                "The platform preempted or evicted the job's pods",
                "Kubernetes took the resources back (a higher-priority workload preempted the \
                 pod, or the node evicted it under pressure or went away). Such attempts are \
                 retried at once and do not use the retry budget; if it keeps happening, run \
                 the job with a higher priority class, ask for fewer resources, or check the \
                 node's memory and disk pressure.",
            )
        },
        RuleSpec {
            log_patterns: strs(&[
                r"CUDA out of memory",
                r"OutOfMemoryError",
                r"CUDA error: out of memory",
                r"CUBLAS_STATUS_ALLOC_FAILED",
            ]),
            error_types: strs(&["OutOfMemoryError", "CudaOutOfMemory"]),
            error_categories: strs(&["cuda-oom"]),
            ..rule(
                "cuda-oom",
                Execution,
                "cuda-oom",
                "CUDA out of memory",
                "The GPU ran out of memory. Reduce the per-GPU batch size or sequence length \
                 (keep the global batch with gradient accumulation), enable gradient \
                 checkpointing and bf16/fp16, shard the model (FSDP/ZeRO), or request GPUs with \
                 more memory; if reserved-but-unallocated memory is large, set \
                 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True.",
            )
        },
        RuleSpec {
            log_patterns: strs(&[
                r"^\s*Killed\s*$",
                r"OOMKilled",
                r"Out of memory: Kill(ed)? process",
                r"Signal 9 \(SIGKILL\)",
                r"oom-kill",
            ]),
            exit_codes: vec![137],
            error_types: strs(&["OOMKilled"]),
            error_categories: strs(&["oom-killed"]),
            ..rule(
                "oom-killed",
                Control,
                "oom-killed",
                "Killed by the out-of-memory killer (SIGKILL, exit code 137)",
                "The process used more host memory than its limit and the kernel killed it. \
                 Request more memory (resources.memory_mib), use fewer DataLoader workers or a \
                 smaller prefetch_factor, load the dataset lazily (streaming / memory-mapped), \
                 and avoid loading full checkpoints on every rank.",
            )
        },
        RuleSpec {
            log_patterns: strs(&[
                r"ModuleNotFoundError",
                r"ImportError: No module named",
                r"No module named '",
            ]),
            error_types: strs(&["ModuleNotFoundError"]),
            ..rule(
                "module-not-found",
                Execution,
                "module-not-found",
                "A Python module is missing",
                "Install the missing package in the image (pip install …, pinned to the \
                 version the code expects), or fix PYTHONPATH / working_dir if the module is \
                 part of the job's own code; check the image tag the job runs.",
            )
        },
        RuleSpec {
            log_patterns: strs(&[
                r"\bloss\b[^\n]{0,40}?[=:\s]\s*[-+]?(nan|inf|infinity)\b",
                r"\bloss (is|became|was) (nan|inf)",
                r"\bnan (loss|detected in loss)",
                r"non-finite loss",
                r"loss (is )?not finite",
            ]),
            ..rule(
                "nan-loss",
                Execution,
                "nan-loss",
                "The loss became NaN",
                "Training diverged. Lower the learning rate or add warmup, clip gradients \
                 (max_grad_norm ≈ 1.0), prefer bf16 over fp16 (or use loss scaling), and check \
                 the data for empty or corrupt samples; torch.autograd.set_detect_anomaly(True) \
                 finds the first non-finite operation.",
            )
        },
        RuleSpec {
            log_patterns: strs(&[
                r"NCCL error",
                r"nccl(Internal|System|UnhandledCuda|Remote)Error|ncclInvalidUsage",
                r"NCCL timeout",
                r"NCCL[^\n]{0,40}timed out",
                r"Watchdog caught collective operation timeout",
                r"NCCL operations have failed or timed out",
                r"NCCL communicator was aborted",
            ]),
            ..rule(
                "nccl",
                Execution,
                "nccl",
                "NCCL collective error or timeout",
                "A collective operation failed or timed out. Check that every rank started \
                 and reaches the same collectives (a rank that crashed or hangs stalls the \
                 others — look for its own error first), the network settings \
                 (NCCL_SOCKET_IFNAME, NCCL_IB_DISABLE) and shared memory (shm_mib); rerun with \
                 NCCL_DEBUG=INFO. Raise the process-group timeout only if one rank is \
                 legitimately slow (e.g. checkpointing).",
            )
        },
        RuleSpec {
            log_patterns: strs(&[
                r"device-side assert triggered",
                r"CUDA driver version is insufficient",
                r"no CUDA-capable device is detected",
                r"CUDA error: (an illegal memory access|invalid device ordinal|unspecified launch failure|no kernel image)",
            ]),
            ..rule(
                "cuda-error",
                Execution,
                "cuda-error",
                "CUDA error",
                "A device-side assert usually means an index out of range (labels ≥ \
                 num_classes, token ids ≥ vocabulary size): rerun with CUDA_LAUNCH_BLOCKING=1 \
                 to see the failing operation. Driver/\"no kernel image\" errors mean the \
                 image's CUDA or PyTorch build does not match the node's driver or GPU.",
            )
        },
        RuleSpec {
            log_patterns: strs(&[r"Segmentation fault", r"\bSIGSEGV\b"]),
            exit_codes: vec![139],
            error_types: strs(&["Segfault"]),
            error_categories: strs(&["segfault"]),
            ..rule(
                "segfault",
                Control,
                "segfault",
                "Segmentation fault (SIGSEGV, exit code 139)",
                "A native extension crashed. Check that compiled extensions (flash-attn, \
                 apex, DeepSpeed ops, bitsandbytes) were built for this PyTorch and CUDA, give \
                 DataLoader workers enough shared memory (shm_mib), and run with \
                 `python -X faulthandler` to get the Python stack of the crash.",
            )
        },
        RuleSpec {
            log_patterns: strs(&[
                r"No space left on device",
                r"\bENOSPC\b",
                r"Disk quota exceeded",
            ]),
            ..rule(
                "disk-full",
                Execution,
                "disk-full",
                "Disk full",
                "The volume holding outputs, checkpoints or caches is full. Free space, write \
                 checkpoints to a larger volume (training.output_path), keep fewer checkpoints \
                 (save_total_limit), and point caches (HF_HOME, TMPDIR) at a volume with room.",
            )
        },
        RuleSpec {
            log_patterns: strs(&[
                r"ImagePullBackOff",
                r"ErrImagePull",
                r"pull access denied",
                r"manifest unknown",
                r"repository does not exist",
            ]),
            error_categories: strs(&["image-pull"]),
            failure_causes: strs(&["image-pull"]),
            ..rule(
                "image-pull",
                Control,
                "image-pull",
                "The container image could not be pulled",
                "Check the image name and tag, that the registry credentials are available \
                 to the runner, and that the runner can reach the registry.",
            )
        },
        RuleSpec {
            log_patterns: strs(&[
                r"Address already in use",
                r"\bEADDRINUSE\b",
                r"\[Errno 98\]",
            ]),
            ..rule(
                "port-in-use",
                Execution,
                "port-in-use",
                "A network port is already in use",
                "Another process (often an earlier attempt or another job on the node) holds \
                 the port. Use a free MASTER_PORT (e.g. derived from the job id) or let torchrun \
                 choose one (--standalone, or --rdzv-endpoint=localhost:0).",
            )
        },
        RuleSpec {
            log_patterns: strs(&[
                r"exec format error",
                r"executable file not found",
                r": command not found",
                r"OCI runtime (create|exec) failed",
                r"could not select device driver",
                r"nvidia-container-cli: initialization error",
            ]),
            error_categories: strs(&["setup"]),
            failure_causes: strs(&["setup"]),
            ..rule(
                "setup",
                Control,
                "setup",
                "The job's environment could not be set up",
                "Check that the command's program exists in the image (argv[0], no shell \
                 syntax), the working_dir exists, the image matches the node's architecture, \
                 and the runner has the NVIDIA container runtime when GPUs are requested.",
            )
        },
        RuleSpec {
            exit_codes: vec![143],
            error_categories: strs(&["terminated"]),
            ..rule(
                "terminated",
                Control,
                "terminated",
                "Stopped by SIGTERM (exit code 143)",
                "The process was asked to stop (cancelled, preempted, or past its deadline). \
                 Save checkpoints regularly and handle SIGTERM to save one on the way out; \
                 retry the job if it was preempted.",
            )
        },
        RuleSpec {
            error_categories: strs(&["deadline"]),
            failure_causes: strs(&["deadline"]),
            ..rule(
                "deadline",
                Control,
                "deadline",
                "The attempt ran past its deadline",
                "Raise spec.deadline if the run legitimately needs longer, or resume from a \
                 checkpoint; check the log for a hang (a stalled step counter).",
            )
        },
        RuleSpec {
            failure_causes: strs(&["platform"]),
            ..rule(
                "runner-lost",
                Control,
                "platform",
                "The runner running the job was lost",
                "The node or its runner stopped responding; this is a platform failure, not \
                 the job's. The job is retried under its retry policy; contact the operators \
                 if it recurs on the same node.",
            )
        },
        RuleSpec {
            severity: Severity::Warning,
            gpu_shm_below_mib: Some(1024),
            ..rule(
                "nccl-shm",
                Resource,
                "resource",
                "GPUs requested with less than 1 GiB of shared memory",
                "NCCL and DataLoader workers use /dev/shm; the container default (64 MiB) \
                 makes multi-GPU jobs fail or hang. Set resources.shm_mib to at least 1024 \
                 (8192 or more for multi-GPU training).",
            )
        },
        RuleSpec {
            fallback: true,
            ..rule(
                "user-code",
                Execution,
                "user-code",
                "The job failed: {error}",
                "Read the traceback in the log from its last frame in the job's own code; fix \
                 the error and resubmit (retrying without a change will fail the same way).",
            )
        },
    ]
}

#[cfg(test)]
#[path = "rules_tests.rs"]
mod tests;
