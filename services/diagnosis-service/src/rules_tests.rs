//! Every rule on realistic log snippets, and the composed report.

use super::*;
use crate::domain::{JobErrorFacts, JobId, Source};
use crate::report::compose;

pub(crate) const CUDA_OOM_LOG: &str = r#"[2025-01-10 12:00:01] INFO Loading checkpoint shards: 100%|██████████| 2/2
[2025-01-10 12:00:09] INFO ***** Running training *****
[2025-01-10 12:00:09] INFO   Num examples = 52002, Num Epochs = 3
{'loss': 1.9321, 'grad_norm': 3.41, 'learning_rate': 1.9e-05, 'epoch': 0.01}
{'loss': 1.7110, 'grad_norm': 2.95, 'learning_rate': 1.8e-05, 'epoch': 0.02}
Traceback (most recent call last):
  File "/workspace/train.py", line 142, in <module>
    main()
  File "/workspace/train.py", line 120, in main
    trainer.train()
  File "/usr/local/lib/python3.10/dist-packages/transformers/trainer.py", line 1938, in train
    return inner_training_loop(
  File "/usr/local/lib/python3.10/dist-packages/torch/_tensor.py", line 522, in backward
    torch.autograd.backward(
  File "/usr/local/lib/python3.10/dist-packages/torch/autograd/graph.py", line 768, in _engine_run_backward
    return Variable._execution_engine.run_backward(  # Calls into the C++ engine to run the backward pass
torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.10 GiB of which 1.20 GiB is free. Process 12345 has 77.90 GiB memory in use. Of the allocated memory 75.30 GiB is allocated by PyTorch, and 1.10 GiB is reserved by PyTorch but unallocated. If reserved but unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See documentation for Memory Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)"#;

const MODULE_LOG: &str = r#"+ python -m trainer.sft --config configs/llama.yaml
Traceback (most recent call last):
  File "/usr/lib/python3.10/runpy.py", line 196, in _run_module_as_main
    return _run_code(code, main_globals, None,
  File "/workspace/trainer/sft.py", line 7, in <module>
    from flash_attn import flash_attn_func
ModuleNotFoundError: No module named 'flash_attn'"#;

const NCCL_LOG: &str = r#"[rank0]:[I ProcessGroupNCCL.cpp:835] [Rank 0] ProcessGroupNCCL initialized with following options: NCCL_ASYNC_ERROR_HANDLING: 3, TIMEOUT(ms): 600000
{'loss': 2.1034, 'learning_rate': 2e-05, 'epoch': 0.1}
[rank1]:[E ProcessGroupNCCL.cpp:563] [Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=1532, OpType=ALLREDUCE, NumelIn=262144000, NumelOut=262144000, Timeout(ms)=600000) ran for 600108 milliseconds before timing out.
[rank1]:[E ProcessGroupNCCL.cpp:1537] [PG 0 Rank 1] Timeout at NCCL work: 1532, last enqueued NCCL work: 1532, last completed NCCL work: 1531.
[rank1]:[E ProcessGroupNCCL.cpp:577] [Rank 1] Some NCCL operations have failed or timed out. Due to the asynchronous nature of CUDA kernels, subsequent GPU operations might run on corrupted/incomplete data.
[rank1]:[E ProcessGroupNCCL.cpp:583] [Rank 1] To avoid data inconsistency, we are taking the entire process down.
terminate called after throwing an instance of 'c10::DistBackendError'
  what():  [PG 0 Rank 1] Process group watchdog thread terminated with exception: [Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=1532, OpType=ALLREDUCE) ran for 600108 milliseconds before timing out.
W0110 12:30:11.123000 140 torch/distributed/elastic/multiprocessing/api.py:858] Sending process 201 closing signal SIGTERM
E0110 12:30:12.456000 140 torch/distributed/elastic/multiprocessing/api.py:833] failed (exitcode: -6) local_rank: 1 (pid: 202) of binary: /usr/bin/python"#;

const KILLED_LOG: &str = r#"loading dataset shards: 61%|██████    | 610/1000 [03:12<02:03,  3.16it/s]
loading dataset shards: 62%|██████▏   | 620/1000 [03:15<02:00,  3.15it/s]"#;

fn lines(text: &str) -> Vec<LogLine> {
    text.lines()
        .enumerate()
        .map(|(i, t)| LogLine::new(i as i64 + 1, t))
        .collect()
}

fn job(state: jpb::JobState, exit_code: Option<i32>, error: Option<JobErrorFacts>) -> JobFacts {
    JobFacts {
        id: JobId::new(),
        owner: "alice".into(),
        name: "llama-sft".into(),
        state,
        failure_cause: jpb::FailureCause::UserCode,
        state_reason: String::new(),
        error,
        exit_code,
        attempts: 1,
        gpus: 0,
        shm_mib: 0,
        workers: 0,
        correlation_id: "cid".into(),
        replicas: Vec::new(),
        checks: Default::default(),
    }
}

fn err(kind: &str, message: &str, category: &str, exit_code: i32) -> Option<JobErrorFacts> {
    Some(JobErrorFacts {
        kind: kind.into(),
        message: message.into(),
        category: category.into(),
        exit_code,
        ..JobErrorFacts::default()
    })
}

fn ids(findings: &[Finding]) -> Vec<&str> {
    findings.iter().map(|f| f.rule_id.as_str()).collect()
}

fn log_numbers(f: &Finding) -> Vec<i64> {
    f.evidence
        .iter()
        .filter(|e| e.source == Source::Log)
        .map(|e| e.line_number)
        .collect()
}

#[test]
fn pytorch_cuda_oom_traceback_is_cuda_oom_with_the_error_line() {
    let j = job(
        jpb::JobState::Failed,
        Some(1),
        err(
            "torch.OutOfMemoryError",
            "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.10 GiB",
            "cuda-oom",
            1,
        ),
    );
    let log = lines(CUDA_OOM_LOG);
    let f = RuleSet::builtin().evaluate(&j, &log);
    assert_eq!(ids(&f), ["cuda-oom"]);
    assert_eq!(log_numbers(&f[0]), [17]);
    assert_eq!(f[0].evidence[0].source, Source::Error);
    assert!(f[0].evidence[0]
        .text
        .starts_with("torch.OutOfMemoryError: CUDA out of memory"));

    let r = compose(&j, log.len(), None, f);
    assert!(!r.healthy);
    assert_eq!(r.category, "cuda-oom");
    assert!(
        r.error
            .starts_with("CUDA out of memory (torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"),
        "{}",
        r.error
    );
    let text: Vec<&str> = r.text.split('\n').collect();
    assert_eq!(text.len(), 4);
    assert_eq!(text[0], "Healthy: No");
    assert_eq!(text[1], format!("Error: {}", r.error));
    assert!(text[2].starts_with("Analysis: Job `"));
    assert!(text[2].contains("[cuda-oom] CUDA out of memory (log line 17:"));
    assert!(text[3].starts_with("Solution: The GPU ran out of memory."));
}

#[test]
fn cuda_oom_is_found_from_the_log_alone() {
    let j = job(jpb::JobState::Failed, Some(1), None);
    let f = RuleSet::builtin().evaluate(&j, &lines(CUDA_OOM_LOG));
    assert_eq!(ids(&f), ["cuda-oom"]);
}

#[test]
fn module_not_found_cites_the_import_line() {
    let j = job(
        jpb::JobState::Failed,
        Some(1),
        err(
            "ModuleNotFoundError",
            "No module named 'flash_attn'",
            "user-code",
            1,
        ),
    );
    let f = RuleSet::builtin().evaluate(&j, &lines(MODULE_LOG));
    assert_eq!(ids(&f), ["module-not-found"]);
    assert_eq!(log_numbers(&f[0]), [7]);
    let r = compose(&j, 7, None, f);
    assert_eq!(
        r.error,
        "A Python module is missing or cannot be imported (ModuleNotFoundError: No module named 'flash_attn')"
    );
}

#[test]
fn nccl_watchdog_timeout_is_nccl_and_the_init_line_is_not_evidence() {
    let j = job(jpb::JobState::Failed, Some(1), None);
    let f = RuleSet::builtin().evaluate(&j, &lines(NCCL_LOG));
    assert_eq!(ids(&f), ["nccl"]);
    let nums = log_numbers(&f[0]);
    assert!(!nums.contains(&1), "{nums:?}");
    assert_eq!(nums[0], 3);
    assert!(nums.contains(&5));
}

#[test]
fn a_preempted_pod_is_preemption_not_its_exit_code() {
    let mut j = job(
        jpb::JobState::Failed,
        Some(137),
        err(
            "Preempted",
            "pod `tm-x-1-worker-0` was preempted: PreemptionByScheduler",
            "preempted",
            137,
        ),
    );
    j.failure_cause = jpb::FailureCause::Preempted;
    let log = lines(KILLED_LOG);
    let f = RuleSet::builtin().evaluate(&j, &log);
    assert_eq!(ids(&f).first(), Some(&"preempted"), "{:?}", ids(&f));
    let r = compose(&j, log.len(), None, f);
    assert_eq!(r.category, "preempted");
    assert!(r.text.contains("do not use the retry budget"), "{}", r.text);
}

#[test]
fn exit_137_without_a_traceback_is_oom_killed() {
    let j = job(
        jpb::JobState::Failed,
        Some(137),
        err(
            "OOMKilled",
            "process was killed by SIGKILL (exit code 137), usually by the out-of-memory killer",
            "oom-killed",
            137,
        ),
    );
    let log = lines(KILLED_LOG);
    let f = RuleSet::builtin().evaluate(&j, &log);
    assert_eq!(ids(&f), ["oom-killed"]);
    assert!(f[0].evidence.iter().any(|e| e.text == "exit code 137"));
    let r = compose(&j, log.len(), None, f);
    assert_eq!(r.category, "oom-killed");
    assert!(r
        .text
        .starts_with("Healthy: No\nError: Killed by the out-of-memory killer"));

    // Without a structured error the exit code alone is enough.
    let bare = job(jpb::JobState::Failed, Some(137), None);
    let mut log = lines(KILLED_LOG);
    log.push(LogLine::new(3, "Killed"));
    let f = RuleSet::builtin().evaluate(&bare, &log);
    assert_eq!(ids(&f), ["oom-killed"]);
    assert_eq!(log_numbers(&f[0]), [3]);
}

#[test]
fn nan_loss_lines_in_their_usual_spellings() {
    let j = job(jpb::JobState::Failed, Some(1), None);
    for line in [
        "{'loss': nan, 'grad_norm': nan, 'learning_rate': 1e-05, 'epoch': 1.2}",
        "step 1200 | Loss: NaN | lr 3e-4",
        "RuntimeError: loss is nan, stopping training",
        "WARNING: NaN loss detected at step 51",
        "train/loss=inf",
    ] {
        let log = vec![LogLine::new(1, "step 1 loss 0.5"), LogLine::new(2, line)];
        let f = RuleSet::builtin().evaluate(&j, &log);
        assert_eq!(ids(&f)[0], "nan-loss", "{line}");
        assert_eq!(log_numbers(&f[0]), [2], "{line}");
    }
    let healthy = vec![LogLine::new(1, "{'loss': 0.35, 'nan_count': 0}")];
    let f = RuleSet::builtin().evaluate(&job(jpb::JobState::Running, None, None), &healthy);
    assert!(f.is_empty(), "{f:?}");
}

#[test]
fn exit_139_is_segfault_and_disk_image_port_setup_match_their_lines() {
    let j = job(jpb::JobState::Failed, Some(139), None);
    let f = RuleSet::builtin().evaluate(
        &j,
        &[LogLine::new(1, "Fatal Python error: Segmentation fault")],
    );
    assert_eq!(ids(&f), ["segfault"]);

    for (line, rule) in [
        ("OSError: [Errno 28] No space left on device: '/outputs/checkpoint-500'", "disk-full"),
        ("Error response from daemon: pull access denied for myorg/trainer, repository does not exist", "image-pull"),
        ("RuntimeError: The server socket has failed to listen on any local network address. The server socket has failed to bind to [::]:29500 (errno: 98 - Address already in use).", "port-in-use"),
        ("exec: \"torchrun\": executable file not found in $PATH", "setup"),
        ("RuntimeError: CUDA error: an illegal memory access was encountered", "cuda-error"),
    ] {
        let j = job(jpb::JobState::Failed, Some(1), None);
        let f = RuleSet::builtin().evaluate(&j, &[LogLine::new(4, line)]);
        assert_eq!(ids(&f), [rule], "{line}");
    }

    // A device-side assert is almost always an index out of range: the
    // data's, before CUDA's.
    let j = job(jpb::JobState::Failed, Some(1), None);
    let f = RuleSet::builtin().evaluate(
        &j,
        &[LogLine::new(
            4,
            "RuntimeError: CUDA error: device-side assert triggered",
        )],
    );
    assert_eq!(ids(&f), ["data-index-out-of-range", "cuda-error"]);

    let mut pull = job(
        jpb::JobState::Failed,
        None,
        err("ImagePull", "manifest for x:1 not found", "image-pull", 0),
    );
    pull.failure_cause = jpb::FailureCause::ImagePull;
    assert_eq!(
        ids(&RuleSet::builtin().evaluate(&pull, &[])),
        ["image-pull"]
    );
}

#[test]
fn an_unexplained_failure_falls_back_to_the_structured_error() {
    let mut e = err("ValueError", "expected 4 labels, got 3", "user-code", 1);
    if let Some(e) = e.as_mut() {
        e.traceback = "Traceback (most recent call last):\n  File \"train.py\", line 3\nValueError: expected 4 labels, got 3".into();
    }
    let j = job(jpb::JobState::Failed, Some(1), e);
    let log = lines("Traceback (most recent call last):\nValueError: expected 4 labels, got 3");
    let f = RuleSet::builtin().evaluate(&j, &log);
    assert_eq!(ids(&f), ["user-code"]);
    assert_eq!(
        f[0].summary,
        "The job failed: ValueError: expected 4 labels, got 3"
    );
    assert_eq!(f[0].category, "user-code");
    let r = compose(&j, log.len(), None, f);
    assert_eq!(
        r.error,
        "The job failed: ValueError: expected 4 labels, got 3"
    );
}

#[test]
fn shm_warning_does_not_hide_the_cause_nor_make_a_success_unhealthy() {
    let mut j = job(jpb::JobState::Failed, Some(1), None);
    j.gpus = 8;
    j.shm_mib = 64;
    let f = RuleSet::builtin().evaluate(&j, &lines(CUDA_OOM_LOG));
    assert_eq!(ids(&f), ["cuda-oom", "nccl-shm"]);
    assert_eq!(f[1].layer, Layer::Resource);
    assert_eq!(f[1].evidence[0].source, Source::Spec);
    let r = compose(&j, 17, None, f);
    assert_eq!(r.category, "cuda-oom");
    assert!(r
        .solution
        .contains("Also: NCCL and DataLoader workers use /dev/shm"));

    j.state = jpb::JobState::Succeeded;
    j.exit_code = Some(0);
    let f = RuleSet::builtin().evaluate(&j, &[LogLine::new(1, "done")]);
    assert_eq!(ids(&f), ["nccl-shm"]);
    let r = compose(&j, 1, None, f);
    assert!(r.healthy);
    assert!(r.text.starts_with("Healthy: Yes\nError: None\n"));
}

#[test]
fn a_running_job_without_findings_is_healthy() {
    let j = job(jpb::JobState::Running, None, None);
    let log = lines("step 1 loss 0.9\nstep 2 loss 0.8");
    let f = RuleSet::builtin().evaluate(&j, &log);
    let r = compose(&j, log.len(), None, f);
    assert!(r.healthy);
    assert_eq!(r.category, "");
    assert_eq!(r.solution, "None");
    assert_eq!(r.text.lines().count(), 4);
}

#[test]
fn many_matches_cite_the_first_and_last_few_lines() {
    let j = job(jpb::JobState::Failed, Some(1), None);
    let log: Vec<LogLine> = (1..=50)
        .map(|i| LogLine::new(i, format!("[rank{i}] NCCL error: unhandled system error")))
        .collect();
    let f = RuleSet::builtin().evaluate(&j, &log);
    assert_eq!(log_numbers(&f[0]), [1, 2, 3, 49, 50]);
}

#[test]
fn extra_rules_from_yaml_go_first_and_replace_by_id() {
    let yaml = r#"
rules:
  - id: hf-offline
    layer: execution
    category: network
    summary: Hugging Face Hub unreachable
    hint: Mount the model locally.
    log_patterns: ["couldn't connect to 'https://huggingface.co'"]
  - id: oom-killed
    layer: control
    category: memory
    summary: Killed (site rule)
    hint: Ask for a bigger node.
    exit_codes: [137]
"#;
    let set = RuleSet::with_extra(RuleSet::parse_yaml(yaml).unwrap()).unwrap();
    assert_eq!(set.ids()[0], "hf-offline");
    // A replaced rule keeps its built-in place (after the one extra rule).
    let builtin = RuleSet::builtin();
    let place = builtin
        .ids()
        .iter()
        .position(|id| *id == "oom-killed")
        .unwrap();
    assert_eq!(set.ids()[1 + place], "oom-killed");
    let j = job(jpb::JobState::Failed, Some(137), None);
    let log = [LogLine::new(
        9,
        "OSError: We couldn't connect to 'https://huggingface.co' to load this file",
    )];
    let f = set.evaluate(&j, &log);
    assert_eq!(ids(&f), ["hf-offline", "oom-killed", "network"]);
    assert_eq!(f[1].category, "memory");

    let bad = "rules:\n  - id: x\n    layer: control\n    category: c\n    summary: s\n    hint: h\n    log_patterns: ['(']\n";
    let err = RuleSet::with_extra(RuleSet::parse_yaml(bad).unwrap()).unwrap_err();
    assert!(err.to_string().contains("rule `x`"), "{err}");
    assert!(RuleSet::parse_yaml("rules:\n  - id: x\n    bogus: 1\n").is_err());
}
