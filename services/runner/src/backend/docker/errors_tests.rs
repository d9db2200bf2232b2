use super::*;

fn server(status_code: u16, message: &str) -> EngineError {
    EngineError::DockerResponseServerError {
        status_code,
        message: message.into(),
    }
}

fn state(exit_code: i64, oom_killed: bool, error: &str) -> ContainerState {
    ContainerState {
        exit_code: Some(exit_code),
        oom_killed: Some(oom_killed),
        error: Some(error.into()),
        ..ContainerState::default()
    }
}

#[test]
fn oom_killed_state_names_the_memory_limit() {
    let e = failure_of(&state(137, true, ""), "img:1", Some(8)).unwrap();
    assert_eq!(e.r#type, "OOMKilled");
    assert_eq!(e.category, "oom-killed");
    assert_eq!(e.exit_code, 137);
    assert_eq!(e.signal, 9);
    assert!(e.retryable);
    assert!(
        e.message.contains("exceeded its memory limit of 8 MiB"),
        "{}",
        e.message
    );
    assert!(e.hint.contains("memory_mib"));
}

#[test]
fn engine_errors_become_structured_errors() {
    let missing = "failed to create shim task: OCI runtime create failed: runc create failed: \
                   unable to start container process: exec: \"/nope\": stat /nope: no such file \
                   or directory: unknown";
    let e = failure_of(&state(127, false, missing), "img:1", None).unwrap();
    assert_eq!(
        (e.r#type.as_str(), e.category.as_str()),
        ("ExecError", "setup")
    );
    assert!(!e.retryable);
    assert_eq!(e.exit_code, 127);
    assert!(e.message.contains("/nope"));
    assert!(e.hint.contains("`img:1`"));

    let e = failure_of(&state(128, false, "cgroup trouble"), "img:1", None).unwrap();
    assert_eq!(e.category, "platform");
    assert!(e.retryable);
}

#[test]
fn plain_failures_and_successes_are_left_to_the_exit_code() {
    assert_eq!(failure_of(&state(3, false, ""), "img", None), None);
    assert_eq!(failure_of(&state(0, true, ""), "img", None), None);
}

#[test]
fn signal_exit_codes_read_back_as_signals() {
    assert_eq!(
        termination(&state(137, false, "")),
        Termination::Signaled(9)
    );
    assert_eq!(
        termination(&state(143, false, "")),
        Termination::Signaled(15)
    );
    assert_eq!(termination(&state(3, false, "")), Termination::Exited(3));
    assert_eq!(
        termination(&state(255, false, "")),
        Termination::Exited(255)
    );
    assert_eq!(
        termination(&ContainerState::default()),
        Termination::Exited(-1)
    );
}

#[test]
fn pull_failures_are_transient_only_for_outages() {
    assert!(!pull_is_transient(
        "pull access denied for nope, repository does not exist or may require 'docker login'"
    ));
    assert!(!pull_is_transient(
        "manifest for img:9 not found: manifest unknown"
    ));
    assert!(!pull_is_transient(
        "Get \"https://registry-1.docker.io/v2/\": dial tcp: lookup registry-1.docker.io: no such host"
    ));
    assert!(pull_is_transient(
        "Get \"http://127.0.0.1:1/v2/\": dial tcp 127.0.0.1:1: connect: connection refused"
    ));
    assert!(pull_is_transient(
        "toomanyrequests: You have reached your pull rate limit"
    ));
    assert!(pull_is_transient("net/http: TLS handshake timeout"));

    let Error::ImagePull {
        image,
        transient,
        reason,
    } = pull_failure("img:1", &server(404, "manifest unknown"))
    else {
        panic!("a pull failure is an ImagePull error");
    };
    assert_eq!((image.as_str(), transient), ("img:1", false));
    assert_eq!(reason, "manifest unknown");
    let je = Error::ImagePull {
        image,
        reason,
        transient,
    }
    .to_job_error();
    assert_eq!(je.category, "image-pull");
    assert!(je.message.contains("`img:1`"));
    assert!(!je.retryable);
}

#[test]
fn missing_device_driver_is_the_nvidia_setup_error() {
    let e = start_failure(
        "c",
        "img",
        server(
            500,
            "could not select device driver \"nvidia\" with capabilities: [[gpu]]",
        ),
    );
    assert!(matches!(e, Error::NoNvidiaRuntime { .. }), "{e:?}");
    let je = e.to_job_error();
    assert_eq!(je.category, "setup");
    assert_eq!(je.r#type, "NvidiaRuntimeMissing");
    assert!(je.message.contains("no NVIDIA runtime"));
    assert!(je.hint.contains("nvidia-container-toolkit"));
    assert!(!je.retryable);

    let e = start_failure(
        "c",
        "img",
        server(400, "exec: \"x\": executable file not found"),
    );
    assert_eq!(e.to_job_error().r#type, "ExecError");
}

#[test]
fn engine_status_helpers_read_the_status() {
    assert!(is_not_found(&server(404, "no such container")));
    assert!(is_conflict(&server(409, "name in use")));
    assert!(!is_not_found(&EngineError::RequestTimeoutError));
    assert_eq!(message_of(&server(500, "boom")), "boom");
}
