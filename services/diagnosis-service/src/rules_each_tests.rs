//! Every built-in rule has a case here that it, and no rule before it,
//! explains: a rule added to `rules/builtin.yaml` without one fails
//! `every_built_in_rule_has_a_case`.

use super::*;
use crate::domain::{JobId, ReplicaFacts};

/// What a case gives the rules besides its log lines.
#[derive(Clone, Copy)]
enum Setup {
    /// Failed with exit 1 and this failure cause.
    Failed(jpb::FailureCause),
    /// Failed with this exit code.
    Exit(i32),
    /// Running, with 2 GPUs and 64 MiB of shared memory.
    RunningOnGpus,
    /// Failed; its worker replica has this reason.
    Replica(&'static str),
    /// Queued; no runner has a GPU.
    NoGpuRunner,
    /// Running, with a 1 h deadline after 2 h runs.
    ShortDeadline,
    /// Failed; only the master replica of three was created.
    OneOfThree,
}

/// (rule, setup, log lines)
const CASES: &[(&str, Setup, &[&str])] = &[
    ("preempted", Setup::Failed(jpb::FailureCause::Preempted), &[]),
    ("beyond-fleet", Setup::NoGpuRunner, &[]),
    ("cuda-oom", Setup::Exit(1), &["torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"]),
    ("data-index-out-of-range", Setup::Exit(1), &["../aten/src/ATen/native/cuda/Indexing.cu:1292: indexSelectLargeIndex: block: [371,0,0], thread: [116,0,0] Assertion `srcIndex < srcSelectDimSize` failed."]),
    ("data-malformed", Setup::Exit(1), &["pyarrow.lib.ArrowInvalid: JSON parse error: Missing a comma or '}' after an object member. in row 10"]),
    ("data-missing", Setup::Exit(1), &["FileNotFoundError: [Errno 2] No such file or directory: '/data/train.jsonl'"]),
    ("oom-killed", Setup::Exit(1), &["      exitcode  : -9 (pid: 3309)"]),
    ("disk-full", Setup::Exit(1), &["RuntimeError: [enforce fail at inline_container.cc:445] . PytorchStreamWriter failed writing file data/176: file write failed"]),
    ("gpu-unavailable", Setup::Exit(1), &["RuntimeError: No CUDA GPUs are available"]),
    ("module-not-found", Setup::Exit(1), &["ImportError: cannot import name 'GradientAccumulator'"]),
    ("nan-loss", Setup::Exit(1), &["Loss is nan, stopping training"]),
    ("cuda-error", Setup::Exit(1), &["RuntimeError: CUDA error: an illegal memory access was encountered"]),
    ("segfault", Setup::Exit(139), &["Fatal Python error: Segmentation fault"]),
    ("shm-bus-error", Setup::Exit(1), &["ERROR: Unexpected bus error encountered in worker. This might be caused by insufficient shared memory (shm)."]),
    ("port-in-use", Setup::Exit(1), &["RuntimeError: The server socket has failed to listen on any local network address. (errno: 98 - Address already in use)."]),
    ("rendezvous", Setup::Exit(1), &["torch.distributed.elastic.rendezvous.api.RendezvousConnectionError: The connection to the C10d store has failed. See inner exception for details."]),
    ("nccl", Setup::Exit(1), &["[rank1]:[E ProcessGroupNCCL.cpp:563] [Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=1532, OpType=ALLREDUCE) ran for 600108 milliseconds before timing out."]),
    ("network", Setup::Exit(1), &["requests.exceptions.ConnectionError: HTTPSConnectionPool(host='huggingface.co', port=443): Max retries exceeded with url: /api/models"]),
    ("image-pull", Setup::Exit(1), &["  Warning  Failed     49s (x4 over 2m27s)  kubelet            Error: ErrImagePull"]),
    ("scheduling", Setup::Exit(1), &["  Warning  FailedScheduling  2s (x57 over 15m)  default-scheduler  0/6 nodes are available: 6 Insufficient nvidia.com/gpu."]),
    ("setup", Setup::Exit(1), &["exec: \"torchrun\": executable file not found in $PATH"]),
    ("crash-loop", Setup::Replica("CrashLoopBackOff"), &[]),
    ("replicas-missing", Setup::OneOfThree, &[]),
    ("terminated", Setup::Exit(143), &[]),
    ("deadline", Setup::Failed(jpb::FailureCause::Deadline), &[]),
    ("runner-lost", Setup::Failed(jpb::FailureCause::Platform), &[]),
    ("gpu-init-warning", Setup::Exit(1), &["/opt/conda/lib/python3.8/site-packages/torch/cuda/__init__.py:138: UserWarning: CUDA initialization: CUDA unknown error - this may be due to an incorrectly set up environment", "False"]),
    ("fp16-overflow", Setup::Exit(1), &["| WARNING: overflow detected, setting loss scale to: 0.00390625", "| WARNING: overflow detected, setting loss scale to: 0.001953125", "| WARNING: overflow detected, setting loss scale to: 0.0009765625"]),
    ("deadline-history", Setup::ShortDeadline, &[]),
    ("nccl-shm", Setup::RunningOnGpus, &[]),
    ("user-code", Setup::Exit(1), &["ValueError: Expected input batch_size (4) to match target batch_size (1)."]),
];

fn job(setup: Setup) -> JobFacts {
    let mut j = JobFacts {
        id: JobId::new(),
        owner: "alice".into(),
        name: "case".into(),
        state: jpb::JobState::Failed,
        failure_cause: jpb::FailureCause::UserCode,
        state_reason: String::new(),
        error: None,
        exit_code: Some(1),
        attempts: 1,
        gpus: 0,
        shm_mib: 0,
        workers: 0,
        correlation_id: String::new(),
        replicas: Vec::new(),
        checks: Default::default(),
    };
    let replica = |role: &str, reason: &str| ReplicaFacts {
        role: role.into(),
        name: format!("case-{role}-0"),
        phase: "Running".into(),
        reason: reason.into(),
        ..ReplicaFacts::default()
    };
    match setup {
        Setup::Failed(cause) => {
            j.failure_cause = cause;
            j.exit_code = None;
        }
        Setup::Exit(code) => j.exit_code = Some(code),
        Setup::RunningOnGpus => {
            j.state = jpb::JobState::Running;
            j.exit_code = None;
            (j.gpus, j.shm_mib) = (2, 64);
        }
        Setup::Replica(reason) => {
            j.workers = 1;
            j.replicas = vec![replica("master", ""), replica("worker", reason)];
        }
        Setup::NoGpuRunner => {
            j.state = jpb::JobState::Queued;
            j.exit_code = None;
            (j.gpus, j.shm_mib) = (8, 8192);
            j.checks.fleet = Some(vec![crate::domain::Offer {
                runner: "cpu-node".into(),
                ..Default::default()
            }]);
        }
        Setup::ShortDeadline => {
            j.state = jpb::JobState::Running;
            j.exit_code = None;
            let h = std::time::Duration::from_secs(3600);
            j.checks.deadline = Some(h);
            j.checks.history = vec![2 * h];
        }
        Setup::OneOfThree => {
            j.workers = 2;
            j.replicas = vec![replica("master", "")];
        }
    }
    j
}

#[test]
fn every_built_in_rule_has_a_case() {
    let rules = RuleSet::builtin();
    let covered: HashSet<&str> = CASES.iter().map(|(id, _, _)| *id).collect();
    for id in rules.ids() {
        assert!(
            covered.contains(id),
            "built-in rule `{id}` has no case in CASES"
        );
    }
}

#[test]
fn each_rule_explains_its_case_first() {
    let rules = RuleSet::builtin();
    for (id, setup, lines) in CASES {
        let log: Vec<LogLine> = lines
            .iter()
            .enumerate()
            .map(|(i, t)| LogLine::new(i as i64 + 1, *t))
            .collect();
        let f = rules.evaluate(&job(*setup), &log);
        assert_eq!(
            f.first().map(|f| f.rule_id.as_str()),
            Some(*id),
            "{id}: {:?}",
            f.iter().map(|f| &f.rule_id).collect::<Vec<_>>()
        );
        assert!(!f[0].hint.is_empty() && !f[0].summary.is_empty(), "{id}");
    }
}
