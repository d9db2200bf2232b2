//! The deployment files pass the binaries only flags and variables they
//! take. A misspelt flag stops a binary at start, but a misspelt variable
//! is ignored without a word, and a renamed one leaves a deployment on the
//! default; both are caught here instead.
//!
//! Read: every overlay under deploy/kubernetes/overlays, rendered with
//! `kubectl kustomize`, and deploy/compose/docker-compose.yml when it
//! exists. For every container whose image is `[REGISTRY/]trainmesh/<binary>`
//! (compose: service), each `--flag` (and `-x`) in its command and args
//! must be one `<binary> --help` lists, and each variable named
//! `TRAINMESH_*`, `OTEL_*` or `RUST_*` (from `env`, or the keys of a
//! ConfigMap in `envFrom`; compose: `environment`) must be one its `--help`
//! lists (`[env: NAME=]`) or one the binary reads outside clap
//! ([`trainmesh_common::telemetry::ENV_VARS`], [`OUTSIDE_CLAP`]).
//!
//! Needs kubectl: without it the test is skipped, with the reason printed,
//! except in CI (CI=true), where it fails.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_yaml::Value;
use trainmesh_tests::{bin_dir, workspace_root};

/// The binaries an image `trainmesh/<binary>` may hold.
const BINARIES: [&str; 6] = [
    "job-service",
    "scheduler-service",
    "metrics-service",
    "diagnosis-service",
    "runner",
    "trainctl",
];

/// The binaries every Kubernetes installation runs (at least one overlay
/// must run each, or the check would pass by not looking).
const DEPLOYED: [&str; 5] = [
    "job-service",
    "scheduler-service",
    "metrics-service",
    "diagnosis-service",
    "runner",
];

/// Variables with these prefixes are checked; others (PATH, DOCKER_HOST,
/// NVIDIA_VISIBLE_DEVICES, ...) are not the binaries' own settings.
const CHECKED_PREFIXES: [&str; 3] = ["TRAINMESH_", "OTEL_", "RUST_"];

/// Variables every binary reads without clap, besides the telemetry ones
/// (`trainmesh_common::telemetry::ENV_VARS`), and who reads them.
const OUTSIDE_CLAP: [(&str, &str); 2] = [
    ("RUST_BACKTRACE", "the Rust standard library, on a panic"),
    (
        "RUST_LIB_BACKTRACE",
        "std::backtrace, when anyhow captures an error's backtrace",
    ),
];

/// The binaries that set up telemetry (`trainmesh_common::telemetry::init`)
/// and so read its variables; `trainctl up` hands them to its children.
fn reads_telemetry_env(binary: &str, subcommand: &[String]) -> bool {
    binary != "trainctl" || subcommand.first().map(String::as_str) == Some("up")
}

/// One container that runs a trainmesh binary, as a deployment file has it.
struct Container {
    /// Where it is, for messages: `overlays/dev: Deployment/runner, container runner`.
    origin: String,
    binary: String,
    /// Its command-line arguments (the image's entrypoint is the binary).
    args: Vec<String>,
    /// Names of the variables it is given.
    env: Vec<String>,
}

/// What `<binary> [SUBCOMMAND...] --help` lists.
#[derive(Default)]
struct Help {
    flags: BTreeSet<String>,
    env: BTreeSet<String>,
}

#[test]
fn deployment_files_pass_only_flags_and_variables_the_binaries_take() {
    let root = workspace_root();
    let mut containers = Vec::new();
    let mut errors = Vec::new();

    match which("kubectl") {
        Some(kubectl) => {
            for overlay in overlays(&root) {
                let rendered = kustomize(&kubectl, &overlay);
                let name = overlay
                    .strip_prefix(root.join("deploy/kubernetes"))
                    .unwrap_or(&overlay)
                    .display()
                    .to_string();
                let found = kubernetes_containers(&name, &rendered, &mut errors);
                assert!(
                    !found.is_empty(),
                    "{name}: no container with a trainmesh/<binary> image in the rendered output"
                );
                containers.extend(found);
            }
            for binary in DEPLOYED {
                assert!(
                    containers.iter().any(|c| c.binary == binary),
                    "no overlay runs {binary}: is its image still trainmesh/{binary}?"
                );
            }
        }
        None if std::env::var("CI").as_deref() == Ok("true") => {
            panic!(
                "CI must have kubectl to render the Kubernetes overlays (kubectl kustomize); \
                 see scripts/check-manifests.sh"
            )
        }
        None => eprintln!(
            "skipped the Kubernetes overlays: kubectl is not on PATH (CI=true makes this fail)"
        ),
    }

    let compose = root.join("deploy/compose/docker-compose.yml");
    if compose.exists() {
        containers.extend(compose_containers(&compose, &mut errors));
    }

    let mut helps: BTreeMap<(String, Vec<String>), Help> = BTreeMap::new();
    for c in &containers {
        check(c, &mut helps, &mut errors);
    }
    eprintln!(
        "checked {} containers: {}",
        containers.len(),
        containers
            .iter()
            .map(|c| c.origin.as_str())
            .collect::<Vec<_>>()
            .join("; ")
    );
    assert!(
        errors.is_empty(),
        "the deployment files pass what the binaries do not take:\n  {}",
        errors.join("\n  ")
    );
}

/// Checks one container's flags and variables against its binary's help.
fn check(
    c: &Container,
    helps: &mut BTreeMap<(String, Vec<String>), Help>,
    errors: &mut Vec<String>,
) {
    // `<binary> healthcheck ADDR [SERVICE]` is answered before clap runs.
    if c.args.first().map(String::as_str) == Some("healthcheck") {
        return;
    }
    // Leading words are subcommands (`trainctl up ...`); their help lists
    // their own flags and the global ones.
    let subcommand: Vec<String> = c
        .args
        .iter()
        .take_while(|a| !a.starts_with('-'))
        .cloned()
        .collect();
    let help = helps
        .entry((c.binary.clone(), subcommand.clone()))
        .or_insert_with(|| help(&c.binary, &subcommand));

    for arg in &c.args[subcommand.len()..] {
        // What follows `--` is positional.
        let flag = if arg == "--" {
            break;
        } else if let Some(long) = arg.strip_prefix("--") {
            format!("--{}", long.split('=').next().unwrap_or(long))
        } else if arg.len() == 2 && arg.starts_with('-') && arg.as_bytes()[1].is_ascii_alphabetic()
        {
            arg.clone()
        } else {
            continue;
        };
        if !help.flags.contains(&flag) {
            errors.push(format!(
                "{}: `{flag}` is not a flag of `{}` (its --help lists {})",
                c.origin,
                command_line(&c.binary, &subcommand),
                help.flags.iter().cloned().collect::<Vec<_>>().join(" ")
            ));
        }
    }

    let telemetry = reads_telemetry_env(&c.binary, &subcommand);
    for name in &c.env {
        if !CHECKED_PREFIXES.iter().any(|p| name.starts_with(p)) {
            continue;
        }
        let known = help.env.contains(name)
            || (telemetry && trainmesh_common::telemetry::ENV_VARS.contains(&name.as_str()))
            || OUTSIDE_CLAP.iter().any(|(n, _)| n == name);
        if !known {
            errors.push(format!(
                "{}: `{name}` is not a variable `{}` reads (neither in its --help nor read \
                 outside clap)",
                c.origin,
                command_line(&c.binary, &subcommand)
            ));
        }
    }
}

fn command_line(binary: &str, subcommand: &[String]) -> String {
    std::iter::once(binary.to_owned())
        .chain(subcommand.iter().cloned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `<binary> [SUBCOMMAND...] --help` from this workspace's build, with
/// an empty environment (clap would print the values of set variables).
fn help(binary: &str, subcommand: &[String]) -> Help {
    let path = bin_dir().join(binary);
    let out = Command::new(&path)
        .args(subcommand)
        .arg("--help")
        .env_clear()
        .output()
        .unwrap_or_else(|e| panic!("run {} --help: {e}", path.display()));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "`{} --help` failed ({}): {}{}",
        command_line(binary, subcommand),
        out.status,
        text,
        String::from_utf8_lossy(&out.stderr)
    );
    let h = parse_help(&text);
    assert!(
        h.flags.contains("--help") && !h.env.is_empty(),
        "`{} --help` lists no flags or no variables; has its format changed?\n{text}",
        command_line(binary, subcommand)
    );
    h
}

/// Flags are the lines that start with `--flag` or `-x, --flag` (clap's
/// layout); variables are the `[env: NAME=...]` notes, found in the text
/// with its line breaks undone.
fn parse_help(text: &str) -> Help {
    let mut h = Help::default();
    for line in text.lines() {
        let mut rest = line.trim_start();
        if rest.len() >= 2 && rest.starts_with('-') && !rest.starts_with("--") {
            let short: String = rest.chars().take(2).collect();
            h.flags.insert(short);
            rest = rest[2..].trim_start_matches(',').trim_start();
        }
        if let Some(long) = rest.strip_prefix("--") {
            let name: String = long
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
                .collect();
            if !name.is_empty() {
                h.flags.insert(format!("--{name}"));
            }
        }
    }
    let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
    for note in flat.split("[env: ").skip(1) {
        let name: String = note
            .chars()
            .take_while(|c| *c != '=' && *c != ']')
            .collect();
        h.env.insert(name.trim().to_owned());
    }
    h
}

#[test]
fn help_parsing_finds_flags_and_variables() {
    let text = "\
Usage: x [OPTIONS]

Options:
      --data-dir <DATA_DIR>
          Directory [env: TRAINMESH_DATA_DIR=] [default: .trainmesh]
      --token <TOKEN>
          The token [env:
          TRAINMESH_TOKEN]
  -o, --output <OUTPUT>
          `--not-a-flag` in a description
  -h, --help
          Print help
";
    let h = parse_help(text);
    let flags: Vec<_> = h.flags.iter().map(String::as_str).collect();
    assert_eq!(
        flags,
        ["--data-dir", "--help", "--output", "--token", "-h", "-o"]
    );
    let env: Vec<_> = h.env.iter().map(String::as_str).collect();
    assert_eq!(env, ["TRAINMESH_DATA_DIR", "TRAINMESH_TOKEN"]);
}

/// The binary an image holds: `[REGISTRY/...]trainmesh/<binary>[:TAG][@DIGEST]`.
fn trainmesh_binary(image: &str) -> Option<&str> {
    let image = image.split('@').next().unwrap_or(image);
    let (path, last) = image.rsplit_once('/')?;
    if path != "trainmesh" && !path.ends_with("/trainmesh") {
        return None;
    }
    Some(last.split(':').next().unwrap_or(last))
}

#[test]
fn images_name_their_binary() {
    assert_eq!(trainmesh_binary("trainmesh/runner:0.1.0"), Some("runner"));
    assert_eq!(
        trainmesh_binary("registry.example.com:5000/ml/trainmesh/job-service:0.1.0@sha256:ab"),
        Some("job-service")
    );
    assert_eq!(
        trainmesh_binary("trainmesh/trainctl:${TRAINMESH_TAG:-0.1.0}"),
        Some("trainctl")
    );
    assert_eq!(trainmesh_binary("postgres:16"), None);
    assert_eq!(trainmesh_binary("library/trainmesh-runner:1"), None);
}

/// Overlay directories under deploy/kubernetes/overlays.
fn overlays(root: &Path) -> Vec<PathBuf> {
    let dir = root.join("deploy/kubernetes/overlays");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("overlay entry").path())
        .filter(|p| p.join("kustomization.yaml").is_file())
        .collect();
    found.sort();
    assert!(!found.is_empty(), "no overlays in {}", dir.display());
    found
}

fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

fn kustomize(kubectl: &Path, overlay: &Path) -> Vec<Value> {
    let out = Command::new(kubectl)
        .arg("kustomize")
        .arg(overlay)
        .output()
        .unwrap_or_else(|e| panic!("run {} kustomize: {e}", kubectl.display()));
    assert!(
        out.status.success(),
        "kubectl kustomize {} failed: {}",
        overlay.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("kustomize output is UTF-8");
    // kustomize separates documents with `---` lines.
    let mut docs = vec![String::new()];
    for line in text.lines() {
        if line == "---" {
            docs.push(String::new());
        } else {
            let doc = docs.last_mut().expect("a document");
            doc.push_str(line);
            doc.push('\n');
        }
    }
    docs.iter()
        .map(|d| serde_yaml::from_str::<Value>(d).expect("kustomize output is YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

fn str_of<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    at(v, path)?.as_str()
}

fn at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(*k))
}

/// Strings of a YAML list (numbers and booleans as written).
fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_sequence)
        .map(|s| s.iter().filter_map(scalar).collect())
        .unwrap_or_default()
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The containers of every workload in one rendered overlay.
fn kubernetes_containers(
    overlay: &str,
    docs: &[Value],
    errors: &mut Vec<String>,
) -> Vec<Container> {
    let config_maps: BTreeMap<&str, Vec<String>> = docs
        .iter()
        .filter(|d| str_of(d, &["kind"]) == Some("ConfigMap"))
        .filter_map(|d| {
            let name = str_of(d, &["metadata", "name"])?;
            let keys = d
                .get("data")
                .and_then(Value::as_mapping)
                .map(|m| {
                    m.keys()
                        .filter_map(|k| k.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            Some((name, keys))
        })
        .collect();

    let mut found = Vec::new();
    for doc in docs {
        let kind = str_of(doc, &["kind"]).unwrap_or_default();
        let pod = match kind {
            "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => {
                at(doc, &["spec", "template", "spec"])
            }
            "CronJob" => at(doc, &["spec", "jobTemplate", "spec", "template", "spec"]),
            "Pod" => doc.get("spec"),
            _ => None,
        };
        let Some(pod) = pod else { continue };
        let workload = format!(
            "{overlay}: {kind}/{}",
            str_of(doc, &["metadata", "name"]).unwrap_or("?")
        );
        for c in containers_of(pod) {
            let Some(image) = str_of(c, &["image"]) else {
                continue;
            };
            let Some(binary) = trainmesh_binary(image) else {
                continue;
            };
            let origin = format!(
                "{workload}, container {}",
                str_of(c, &["name"]).unwrap_or("?")
            );
            if !BINARIES.contains(&binary) {
                errors.push(format!("{origin}: image {image} holds no trainmesh binary"));
                continue;
            }
            // The entrypoint is the binary; a `command` replaces it, and its
            // first word is then the program.
            let mut args: Vec<String> = strings(c.get("command")).into_iter().skip(1).collect();
            args.extend(strings(c.get("args")));

            let mut env: Vec<String> = c
                .get("env")
                .and_then(Value::as_sequence)
                .map(|s| {
                    s.iter()
                        .filter_map(|e| str_of(e, &["name"]).map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            for from in c
                .get("envFrom")
                .and_then(Value::as_sequence)
                .into_iter()
                .flatten()
            {
                let prefix = str_of(from, &["prefix"]).unwrap_or("");
                if let Some(name) = str_of(from, &["configMapRef", "name"]) {
                    match config_maps.get(name) {
                        Some(keys) => env.extend(keys.iter().map(|k| format!("{prefix}{k}"))),
                        None => errors.push(format!(
                            "{origin}: envFrom names ConfigMap {name}, which the overlay does \
                             not define, so its variables cannot be checked"
                        )),
                    }
                }
                if let Some(name) = str_of(from, &["secretRef", "name"]) {
                    errors.push(format!(
                        "{origin}: envFrom takes every key of Secret {name}, whose names cannot \
                         be checked; list them in `env` with `secretKeyRef` instead"
                    ));
                }
            }
            found.push(Container {
                origin,
                binary: binary.to_owned(),
                args,
                env,
            });
        }
    }
    found
}

/// A pod's init containers and containers.
fn containers_of(pod: &Value) -> Vec<&Value> {
    ["initContainers", "containers"]
        .iter()
        .filter_map(|k| pod.get(*k).and_then(Value::as_sequence))
        .flatten()
        .collect()
}

/// The services of a compose file whose image is a trainmesh one.
fn compose_containers(path: &Path, errors: &mut Vec<String>) -> Vec<Container> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let mut doc: Value = serde_yaml::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not YAML: {e}", path.display()));
    // `<<: *defaults` merge keys, common in compose files.
    doc.apply_merge()
        .unwrap_or_else(|e| panic!("{}: merge keys: {e}", path.display()));
    let services = doc
        .get("services")
        .and_then(Value::as_mapping)
        .unwrap_or_else(|| panic!("{} has no `services` mapping", path.display()));

    let words = |v: Option<&Value>| -> Vec<String> {
        match v {
            Some(Value::String(s)) => s.split_whitespace().map(str::to_owned).collect(),
            other => strings(other),
        }
    };
    let mut found = Vec::new();
    for (name, svc) in services {
        let name = name.as_str().unwrap_or("?");
        let Some(image) = str_of(svc, &["image"]) else {
            continue;
        };
        let Some(binary) = trainmesh_binary(image) else {
            continue;
        };
        let origin = format!("deploy/compose/docker-compose.yml: service {name}");
        if !BINARIES.contains(&binary) {
            errors.push(format!("{origin}: image {image} holds no trainmesh binary"));
            continue;
        }
        // An `entrypoint` replaces the binary; its first word is the program.
        let mut args: Vec<String> = words(svc.get("entrypoint")).into_iter().skip(1).collect();
        args.extend(words(svc.get("command")));
        let env = match svc.get("environment") {
            Some(Value::Mapping(m)) => m.keys().filter_map(scalar).collect(),
            Some(Value::Sequence(s)) => s
                .iter()
                .filter_map(scalar)
                .map(|kv| kv.split('=').next().unwrap_or_default().to_owned())
                .collect(),
            _ => Vec::new(),
        };
        found.push(Container {
            origin,
            binary: binary.to_owned(),
            args,
            env,
        });
    }
    found
}
