use super::*;

const SIMPLE: &str = r#"epoch 1 loss 0.53
Traceback (most recent call last):
  File "/app/train.py", line 42, in <module>
    main()
  File "/app/train.py", line 38, in main
    raise ValueError("learning rate must be positive, got -0.1")
ValueError: learning rate must be positive, got -0.1
"#;

const CHAINED: &str = r#"loading checkpoint
Traceback (most recent call last):
  File "/app/train.py", line 10, in load
    return state["model"]
           ~~~~~^^^^^^^^^
KeyError: 'model'

During handling of the above exception, another exception occurred:

Traceback (most recent call last):
  File "/app/train.py", line 20, in <module>
    load(path)
  File "/app/train.py", line 12, in load
    raise RuntimeError(f"bad checkpoint {path}")
RuntimeError: bad checkpoint /ckpt/last.pt
"#;

const DIRECT_CAUSE: &str = r#"Traceback (most recent call last):
  File "/app/a.py", line 3, in <module>
    open("/nope")
FileNotFoundError: [Errno 2] No such file or directory: '/nope'

The above exception was the direct cause of the following exception:

Traceback (most recent call last):
  File "/app/a.py", line 5, in <module>
    raise ConfigError("config missing") from e
__main__.ConfigError: config missing
"#;

const CUDA_OOM: &str = r#"step 120 loss 2.1
Traceback (most recent call last):
  File "/workspace/train.py", line 88, in <module>
    loss.backward()
  File "/usr/lib/python3/dist-packages/torch/_tensor.py", line 581, in backward
    torch.autograd.backward(
torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.11 GiB of which 1.02 GiB is free.
"#;

const NO_MESSAGE: &str = r#"Traceback (most recent call last):
  File "/app/train.py", line 7, in <module>
    time.sleep(100)
KeyboardInterrupt
"#;

const EMPTY_MESSAGE: &str = r#"Traceback (most recent call last):
  File "/app/x.py", line 1, in <module>
    raise AssertionError()
AssertionError
"#;

const SYNTAX_IMPORTED: &str = r#"Traceback (most recent call last):
  File "/app/main.py", line 1, in <module>
    import model
  File "/app/model.py", line 3
    def forward(self x):
                     ^
SyntaxError: invalid syntax. Perhaps you forgot a comma?
"#;

const SYNTAX_MAIN: &str = r#"  File "/app/train.py", line 12
    print("epoch" epoch)
          ^^^^^^^^^^^^^
SyntaxError: invalid syntax. Perhaps you forgot a comma?
"#;

const TORCHRUN: &str = r#"[rank1]: some unrelated line
[rank0]: Traceback (most recent call last):
[rank1]: still going
[rank0]:   File "/app/ddp.py", line 30, in <module>
[rank0]:     dist.all_reduce(t)
[rank0]: torch.distributed.DistBackendError: NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled system error
"#;

#[test]
fn simple_traceback_gives_type_message_and_text() {
    let e = last_python_traceback(SIMPLE).unwrap();
    assert_eq!(e.type_name, "ValueError");
    assert_eq!(e.message, "learning rate must be positive, got -0.1");
    assert!(e
        .traceback
        .starts_with("Traceback (most recent call last):"));
    assert!(e
        .traceback
        .ends_with("ValueError: learning rate must be positive, got -0.1"));
    assert!(e.traceback.contains("line 38, in main"));
    assert!(!e.traceback.contains("epoch 1"));
}

#[test]
fn chained_exception_takes_the_last_and_keeps_the_chain_text() {
    let e = last_python_traceback(CHAINED).unwrap();
    assert_eq!(e.type_name, "RuntimeError");
    assert_eq!(e.message, "bad checkpoint /ckpt/last.pt");
    assert!(e
        .traceback
        .starts_with("Traceback (most recent call last):"));
    assert!(e.traceback.contains("KeyError: 'model'"));
    assert!(e
        .traceback
        .contains("During handling of the above exception"));
    assert!(e
        .traceback
        .ends_with("RuntimeError: bad checkpoint /ckpt/last.pt"));
    assert!(!e.traceback.contains("loading checkpoint"));
}

#[test]
fn direct_cause_chain_with_dotted_type() {
    let e = last_python_traceback(DIRECT_CAUSE).unwrap();
    assert_eq!(e.type_name, "__main__.ConfigError");
    assert_eq!(e.message, "config missing");
    assert!(e.traceback.contains("FileNotFoundError"));
}

#[test]
fn dotted_module_type_is_kept_whole() {
    let e = last_python_traceback(CUDA_OOM).unwrap();
    assert_eq!(e.type_name, "torch.OutOfMemoryError");
    assert!(e
        .message
        .starts_with("CUDA out of memory. Tried to allocate 2.00 GiB"));
}

#[test]
fn exception_without_message() {
    let e = last_python_traceback(NO_MESSAGE).unwrap();
    assert_eq!(e.type_name, "KeyboardInterrupt");
    assert_eq!(e.message, "");
    let e = last_python_traceback(EMPTY_MESSAGE).unwrap();
    assert_eq!(e.type_name, "AssertionError");
    assert_eq!(e.message, "");
}

#[test]
fn syntax_error_with_caret_lines() {
    let e = last_python_traceback(SYNTAX_IMPORTED).unwrap();
    assert_eq!(e.type_name, "SyntaxError");
    assert_eq!(e.message, "invalid syntax. Perhaps you forgot a comma?");
    assert!(e.traceback.contains("                     ^"));

    let e = last_python_traceback(SYNTAX_MAIN).unwrap();
    assert_eq!(e.type_name, "SyntaxError");
    assert!(e.traceback.starts_with("  File \"/app/train.py\", line 12"));
    assert!(e.traceback.contains("^^^^^^^^^^^^^"));
}

#[test]
fn the_last_of_several_tracebacks_wins() {
    let log = format!("{SIMPLE}retrying\n{NO_MESSAGE}");
    let e = last_python_traceback(&log).unwrap();
    assert_eq!(e.type_name, "KeyboardInterrupt");
    assert!(!e.traceback.contains("ValueError"));
}

#[test]
fn prefixed_lines_from_torchrun_are_understood() {
    let e = last_python_traceback(TORCHRUN).unwrap();
    assert_eq!(e.type_name, "torch.distributed.DistBackendError");
    assert!(e.message.starts_with("NCCL error in"));
    assert!(!e.traceback.contains("still going"));
    assert!(e.traceback.contains("dist.all_reduce(t)"));
}

#[test]
fn log_lines_between_frames_are_not_taken_for_the_exception() {
    let log = "Traceback (most recent call last):\n  File \"a.py\", line 1, in <module>\nINFO: checkpoint saved\n  File \"b.py\", line 2, in f\n    g()\nOSError: disk full\n";
    let e = last_python_traceback(log).unwrap();
    assert_eq!(e.type_name, "OSError");
    assert_eq!(e.message, "disk full");
}

#[test]
fn no_traceback_in_plain_output() {
    assert_eq!(last_python_traceback("hello\nworld\n"), None);
    assert_eq!(last_python_traceback(""), None);
    // A header whose exception line never came (the process was killed).
    assert_eq!(
        last_python_traceback("Traceback (most recent call last):\n  File \"a.py\", line 1\n"),
        None
    );
}

#[test]
fn clean_exit_is_no_error() {
    assert_eq!(classify(Termination::Exited(0), SIMPLE), None);
}

#[test]
fn user_code_failure_with_traceback() {
    let e = classify(Termination::Exited(1), SIMPLE).unwrap();
    assert_eq!(e.r#type, "ValueError");
    assert_eq!(e.message, "learning rate must be positive, got -0.1");
    assert_eq!(e.category, "user-code");
    assert_eq!(e.exit_code, 1);
    assert_eq!(e.signal, 0);
    assert!(!e.retryable);
    assert!(e.traceback.contains("line 42"));
}

#[test]
fn nonzero_exit_without_traceback_names_the_code_and_last_line() {
    let e = classify(Termination::Exited(3), "starting\nconfig invalid: lr\n\n").unwrap();
    assert_eq!(e.r#type, "NonZeroExit");
    assert_eq!(e.message, "process exited with code 3: config invalid: lr");
    assert_eq!(e.category, "user-code");
    assert!(!e.retryable);
    assert_eq!(e.traceback, "");

    let e = classify(Termination::Exited(2), "").unwrap();
    assert_eq!(e.message, "process exited with code 2");
}

#[test]
fn sigkill_is_oom_killed() {
    for term in [Termination::Signaled(9), Termination::Exited(137)] {
        let e = classify(term, "epoch 3\n").unwrap();
        assert_eq!(e.r#type, "OOMKilled");
        assert_eq!(e.category, "oom-killed");
        assert_eq!(e.exit_code, 137);
        assert!(e.retryable);
        assert!(e.hint.contains("memory"));
    }
    assert_eq!(classify(Termination::Signaled(9), "").unwrap().signal, 9);
    assert_eq!(classify(Termination::Exited(137), "").unwrap().signal, 0);
}

#[test]
fn sigsegv_is_segfault_and_sigterm_is_terminated() {
    let e = classify(Termination::Signaled(11), "").unwrap();
    assert_eq!(e.r#type, "Segfault");
    assert_eq!(e.category, "segfault");
    assert_eq!(e.exit_code, 139);
    assert_eq!(e.signal, 11);

    let e = classify(Termination::Exited(143), "").unwrap();
    assert_eq!(e.r#type, "SIGTERM");
    assert_eq!(e.category, "terminated");
}

#[test]
fn other_signals_are_named() {
    let e = classify(Termination::Signaled(6), "").unwrap();
    assert_eq!(e.category, "signal");
    assert_eq!(e.exit_code, 134);
    assert!(e.message.contains("SIGABRT"), "{}", e.message);
    assert!(e.retryable);
}

#[test]
fn cuda_oom_gets_its_category_and_hint() {
    let e = classify(Termination::Exited(1), CUDA_OOM).unwrap();
    assert_eq!(e.category, "cuda-oom");
    assert_eq!(e.r#type, "torch.OutOfMemoryError");
    assert!(e.hint.contains("batch size"));
    assert!(e.hint.contains("gradient checkpointing"));
    assert!(!e.retryable);

    // Without a traceback the log text decides.
    let e = classify(
        Termination::Exited(1),
        "RuntimeError: CUDA error: out of memory (no traceback printed)\n",
    )
    .unwrap();
    assert_eq!(e.category, "cuda-oom");
}

#[test]
fn an_earlier_cuda_oom_does_not_override_the_final_traceback() {
    let log = format!("warning: CUDA out of memory, retrying with a smaller batch\n{SIMPLE}");
    let e = classify(Termination::Exited(1), &log).unwrap();
    assert_eq!(e.category, "user-code");
}

#[test]
fn module_not_found_has_a_hint() {
    let log = "Traceback (most recent call last):\n  File \"t.py\", line 1, in <module>\n    import deepspeed\nModuleNotFoundError: No module named 'deepspeed'\n";
    let e = classify(Termination::Exited(1), log).unwrap();
    assert_eq!(e.r#type, "ModuleNotFoundError");
    assert!(e.hint.contains("install"));
}

#[test]
fn exec_error_is_a_setup_error() {
    let e = exec_error(
        "/no/such/bin",
        &std::io::Error::from_raw_os_error(libc::ENOENT),
    );
    assert_eq!(e.category, "setup");
    assert_eq!(e.r#type, "ExecError");
    assert_eq!(e.exit_code, -1);
    assert!(e.message.contains("/no/such/bin"));
    assert!(e.message.contains("No such file or directory"));
    assert!(!e.retryable);
}

#[test]
fn deadline_error_names_the_deadline() {
    let e = deadline_error(
        std::time::Duration::from_secs(30),
        Termination::Signaled(15),
    );
    assert_eq!(e.category, "deadline");
    assert_eq!(e.exit_code, 143);
    assert!(e.message.contains("30s"));
}

#[test]
fn preempted_error_keeps_the_end_and_is_not_the_jobs_fault() {
    let e = preempted_error(
        "Evicted",
        "the master (pod `p`) was evicted by Kubernetes".into(),
        Termination::Signaled(15),
    );
    assert_eq!(
        (e.r#type.as_str(), e.category.as_str()),
        ("Evicted", "preempted")
    );
    assert_eq!(e.category, CATEGORY_PREEMPTED);
    assert_eq!((e.exit_code, e.signal), (143, 15));
    assert!(e.retryable);
    assert!(e.hint.contains("does not use the job's retry budget"));
    // The same SIGTERM alone is the job's own termination.
    let own = classify(Termination::Signaled(15), "").unwrap();
    assert_eq!(own.category, "terminated");
}

const NO_GPUS: &str = r#"loading model
Traceback (most recent call last):
  File "/app/train.py", line 5, in <module>
    torch.cuda.set_device(0)
  File "/usr/lib/python3/dist-packages/torch/cuda/__init__.py", line 302, in _lazy_init
    torch._C._cuda_init()
RuntimeError: No CUDA GPUs are available
"#;

const DRIVER_MISMATCH: &str = r#"Traceback (most recent call last):
  File "/app/train.py", line 3, in <module>
    x = torch.zeros(1).cuda()
RuntimeError: The NVIDIA driver on your system is too old (found version 11040). CUDA driver version is insufficient for CUDA runtime version
"#;

const XID_THEN_ERROR: &str = r#"step 900 loss 1.2
[Tue Mar  4 10:12:01 2025] NVRM: Xid (PCI:0000:3b:00): 79, pid=1234, GPU has fallen off the bus.
Traceback (most recent call last):
  File "/app/train.py", line 40, in <module>
    loss.item()
RuntimeError: CUDA error: unspecified launch failure
"#;

const GPUS: AttemptFacts = AttemptFacts {
    gpus: 1,
    single_node: true,
};

#[test]
fn no_visible_gpu_is_a_node_fault() {
    let e = classify(Termination::Exited(1), NO_GPUS).unwrap();
    assert_eq!(e.category, CATEGORY_GPU_UNAVAILABLE);
    assert!(e.node_fault);
    assert!(e.retryable);
    assert_eq!(e.r#type, "RuntimeError");
    assert_eq!(e.message, "No CUDA GPUs are available");
    assert!(e.hint.contains("another runner"), "{}", e.hint);
    // The runner keeps it for an attempt that was given GPUs.
    assert!(judge_node_fault(e, GPUS).node_fault);
    // Without a traceback the log decides.
    let e = classify(
        Termination::Exited(1),
        "CUDA error: no CUDA-capable device is detected\n",
    )
    .unwrap();
    assert!(e.node_fault, "{e:?}");
    assert_eq!(e.r#type, "GpuUnavailable");
}

#[test]
fn driver_mismatch_and_broken_gpus_are_node_faults() {
    let e = classify(Termination::Exited(1), DRIVER_MISMATCH).unwrap();
    assert!(e.node_fault, "{e:?}");
    // The kernel's Xid line counts whatever the exception says.
    let e = classify(Termination::Exited(1), XID_THEN_ERROR).unwrap();
    assert!(e.node_fault, "{e:?}");
    assert_eq!(e.category, CATEGORY_GPU_UNAVAILABLE);
    assert_eq!(e.message, "CUDA error: unspecified launch failure");
    // A driver failure that aborts the process is one too.
    let e = classify(
        Termination::Signaled(6),
        "RuntimeError: Found no NVIDIA driver on your system.\n",
    )
    .unwrap();
    assert!(e.node_fault, "{e:?}");
    assert_eq!(e.exit_code, 134);
}

#[test]
fn an_earlier_gpu_warning_is_not_a_node_fault() {
    let log = format!("No CUDA GPUs are available, training on the CPU\n{SIMPLE}");
    let e = classify(Termination::Exited(1), &log).unwrap();
    assert_eq!(e.category, CATEGORY_USER_CODE);
    assert!(!e.node_fault);
    // A CUDA out-of-memory error is the job's, not the node's.
    let e = classify(Termination::Exited(1), CUDA_OOM).unwrap();
    assert!(!e.node_fault);
}

#[test]
fn a_job_given_no_gpus_that_finds_none_has_a_fault_of_its_own() {
    let e = classify(Termination::Exited(1), NO_GPUS).unwrap();
    let e = judge_node_fault(
        e,
        AttemptFacts {
            gpus: 0,
            single_node: true,
        },
    );
    assert!(!e.node_fault);
    assert!(!e.retryable);
    assert_eq!(e.category, CATEGORY_USER_CODE);
    assert!(e.hint.contains("spec.resources.gpus is 0"), "{}", e.hint);
}

#[test]
fn nccl_system_errors_are_the_nodes_only_on_a_single_node() {
    let e = classify(Termination::Exited(1), TORCHRUN).unwrap();
    assert!(e.node_fault, "{e:?}");
    assert!(judge_node_fault(e.clone(), GPUS).node_fault);
    let spread = judge_node_fault(
        e,
        AttemptFacts {
            gpus: 8,
            single_node: false,
        },
    );
    assert!(!spread.node_fault);
    assert_eq!(spread.category, CATEGORY_USER_CODE);
    assert!(spread.hint.contains("network"), "{}", spread.hint);
}
