//! The rule set scored on a corpus of real failure logs and healthy runs
//! that users pasted into public issue threads (`tests/corpus/cases`, each
//! with its source URL and a label).
//!
//! Every case is run as the mesh runs it: the runner's classifier turns
//! the exit and the log into the job's structured error, then the rules and
//! the report judge the job. Failures are judged twice: with the exit code
//! the job would have had (137 for a SIGKILL, 139 for a segfault), and with
//! every failure exiting 1. Healthy runs are judged while running, so any
//! error finding on their noise counts against the rules.
//!
//! A third of the cases, chosen by a hash of the file name, are held out:
//! the rules are not tuned on them, and the test reports them apart.
//! Run with `--no-capture` to see the tables.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use diagnosis_service::domain::{JobErrorFacts, JobFacts, JobId, LogLine};
use diagnosis_service::report;
use diagnosis_service::rules::RuleSet;
use runner::domain::Termination;
use runner::job_error::classify;
use trainmesh_common::proto::job::v1 as jpb;

const HEALTHY: &str = "healthy";
/// Lines the service reads from the end of a log.
const TAIL_LINES: usize = 1000;

/// The bar: held-out accuracy with realistic exit codes.
const MIN_HELD_OUT_ACCURACY: f64 = 0.90;
const MAX_HEALTHY_JUDGED_FAILED: f64 = 0.05;

#[derive(Clone, Debug)]
struct Case {
    name: String,
    label: String,
    exit_code: i32,
    log: String,
    held_out: bool,
    /// Why the case cannot be scored (the paste stops before the error),
    /// when an audit found so; such cases are kept with their source but
    /// not counted.
    unusable: Option<String>,
}

/// `cases` (scored, a third held out) or `fresh` (collected after the
/// rules were last tuned: reported on its own, not yet tuned on).
fn corpus_dir(part: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus")
        .join(part)
}

/// FNV-1a: a split that does not change between runs or machines.
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn parse(name: &str, text: &str) -> Case {
    let (header, log) = text
        .split_once("\n# ---\n")
        .unwrap_or_else(|| panic!("{name}: no `# ---` line after the header"));
    let mut fields = BTreeMap::new();
    for line in header.lines() {
        let (k, v) = line
            .strip_prefix("# ")
            .and_then(|l| l.split_once(": "))
            .unwrap_or_else(|| panic!("{name}: bad header line `{line}`"));
        fields.insert(k.trim().to_owned(), v.trim().to_owned());
    }
    let source = &fields["source"];
    assert!(source.starts_with("https://"), "{name}: source `{source}`");
    let label = fields["label"].clone();
    let exit_code = fields["exit_code"]
        .parse()
        .unwrap_or_else(|e| panic!("{name}: exit_code: {e}"));
    assert_eq!(
        label == HEALTHY,
        exit_code == 0,
        "{name}: healthy iff exit 0"
    );
    Case {
        unusable: fields.get("unusable").cloned(),
        held_out: fnv(name).is_multiple_of(3),
        name: name.to_owned(),
        label,
        exit_code,
        log: log.to_owned(),
    }
}

fn load() -> Vec<Case> {
    load_dir("cases")
}

fn load_dir(part: &str) -> Vec<Case> {
    let dir = corpus_dir(part);
    if part != "cases" && !dir.exists() {
        return Vec::new();
    }
    let mut cases: Vec<Case> = std::fs::read_dir(dir)
        .expect("corpus directory")
        .map(|e| e.expect("corpus entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .map(|p| {
            let name = p.file_stem().and_then(|s| s.to_str()).expect("utf-8 name");
            let text = std::fs::read_to_string(&p).expect("utf-8 case");
            parse(name, &text)
        })
        .collect();
    cases.sort_by(|a, b| a.name.cmp(&b.name));
    cases
}

fn termination(code: i32) -> Termination {
    match code {
        137 => Termination::Signaled(9),
        139 => Termination::Signaled(11),
        143 => Termination::Signaled(15),
        c => Termination::Exited(c),
    }
}

/// The category the mesh gives `case` ("healthy" when judged healthy).
fn judge(rules: &RuleSet, case: &Case, exit_code: i32) -> String {
    let lines: Vec<&str> = case.log.lines().collect();
    let tail = &lines[lines.len().saturating_sub(TAIL_LINES)..];
    let log: Vec<LogLine> = tail
        .iter()
        .enumerate()
        .map(|(i, t)| LogLine::new(i as i64 + 1, *t))
        .collect();
    let failed = case.label != HEALTHY;
    let error = failed
        .then(|| classify(termination(exit_code), &tail.join("\n")))
        .flatten()
        .map(|e| JobErrorFacts {
            kind: e.r#type,
            message: e.message,
            traceback: e.traceback,
            exit_code: e.exit_code,
            signal: e.signal,
            category: e.category,
            hint: e.hint,
        });
    let job = JobFacts {
        id: JobId::new(),
        owner: "alice".into(),
        name: case.name.clone(),
        state: if failed {
            jpb::JobState::Failed
        } else {
            jpb::JobState::Running
        },
        failure_cause: if failed {
            jpb::FailureCause::UserCode
        } else {
            jpb::FailureCause::Unspecified
        },
        state_reason: String::new(),
        error,
        exit_code: failed.then_some(exit_code),
        attempts: 1,
        gpus: 1,
        shm_mib: 8192,
        workers: 0,
        correlation_id: String::new(),
        replicas: Vec::new(),
        checks: Default::default(),
    };
    let findings = rules.evaluate(&job, &log);
    let rep = report::compose(&job, log.len(), None, findings);
    if rep.healthy {
        HEALTHY.to_owned()
    } else {
        rep.category
    }
}

#[derive(Default)]
struct Score {
    /// label → (support, correct)
    recall: BTreeMap<String, (usize, usize)>,
    /// predicted → (predicted, correct)
    precision: BTreeMap<String, (usize, usize)>,
    misses: Vec<String>,
}

impl Score {
    fn add(&mut self, case: &Case, got: &str) {
        let ok = got == case.label;
        let r = self.recall.entry(case.label.clone()).or_default();
        r.0 += 1;
        r.1 += usize::from(ok);
        let p = self.precision.entry(got.to_owned()).or_default();
        p.0 += 1;
        p.1 += usize::from(ok);
        if !ok {
            self.misses
                .push(format!("{}: {} judged {got}", case.name, case.label));
        }
    }

    fn total(&self) -> (usize, usize) {
        self.recall
            .values()
            .fold((0, 0), |(n, c), (s, k)| (n + s, c + k))
    }

    fn accuracy(&self) -> f64 {
        let (n, c) = self.total();
        c as f64 / n.max(1) as f64
    }

    /// Failures judged healthy, healthy runs judged failed, healthy runs.
    fn health_errors(&self, cases: &[&Case], got: &[String]) -> (usize, usize, usize) {
        let mut out = (0, 0, 0);
        for (c, g) in cases.iter().zip(got) {
            match (c.label == HEALTHY, g == HEALTHY) {
                (false, true) => out.0 += 1,
                (true, false) => out.1 += 1,
                _ => {}
            }
            out.2 += usize::from(c.label == HEALTHY);
        }
        out
    }

    fn table(&self, title: &str) -> String {
        let (n, c) = self.total();
        let mut s = format!(
            "{title}: {c}/{n} = {:.1} %\n{:<18} {:>7} {:>9} {:>7}\n",
            100.0 * self.accuracy(),
            "category",
            "support",
            "precision",
            "recall"
        );
        let cats: std::collections::BTreeSet<&String> =
            self.recall.keys().chain(self.precision.keys()).collect();
        for cat in cats {
            let (sup, hit) = self.recall.get(cat).copied().unwrap_or_default();
            let (pred, phit) = self.precision.get(cat).copied().unwrap_or_default();
            let pct = |a: usize, b: usize| {
                if b == 0 {
                    "-".to_owned()
                } else {
                    format!("{:.0} %", 100.0 * a as f64 / b as f64)
                }
            };
            s.push_str(&format!(
                "{cat:<18} {sup:>7} {:>9} {:>7}\n",
                pct(phit, pred),
                pct(hit, sup)
            ));
        }
        s
    }
}

struct Run {
    score: Score,
    /// (failures judged healthy, healthy judged failed, healthy runs)
    health: (usize, usize, usize),
}

fn run(rules: &RuleSet, cases: &[&Case], every_failure_exits_1: bool) -> Run {
    let got: Vec<String> = cases
        .iter()
        .map(|c| {
            let code = if every_failure_exits_1 && c.exit_code != 0 {
                1
            } else {
                c.exit_code
            };
            judge(rules, c, code)
        })
        .collect();
    let mut score = Score::default();
    for (c, g) in cases.iter().zip(&got) {
        score.add(c, g);
    }
    let health = score.health_errors(cases, &got);
    Run { score, health }
}

#[test]
fn the_rules_name_the_root_cause_of_real_failures() {
    // The same paste posted to two projects counts once.
    let mut seen = std::collections::HashSet::new();
    let cases: Vec<Case> = load()
        .into_iter()
        .filter(|c| c.unusable.is_none() && seen.insert(c.log.clone()))
        .collect();
    let rules = RuleSet::builtin();
    let failures = cases.iter().filter(|c| c.label != HEALTHY).count();
    assert!(failures >= 150, "the corpus has {failures} failures");
    let tuned: Vec<&Case> = cases.iter().filter(|c| !c.held_out).collect();
    let held: Vec<&Case> = cases.iter().filter(|c| c.held_out).collect();

    let mut report = String::new();
    let mut results = Vec::new();
    for (part, set) in [("tuning part", &tuned), ("held-out part", &held)] {
        for exits_1 in [false, true] {
            let r = run(&rules, set, exits_1);
            let mode = if exits_1 {
                "every failure exits 1"
            } else {
                "realistic exit codes"
            };
            report.push_str(&r.score.table(&format!("{part}, {mode}")));
            report.push_str(&format!(
                "failures judged healthy: {}; healthy runs judged failed: {}/{}\n",
                r.health.0, r.health.1, r.health.2,
            ));
            // The held-out misses are not shown: reading them would be
            // tuning on them.
            if part == "tuning part" {
                report.push_str(&format!("misses:\n  {}\n", r.score.misses.join("\n  ")));
            }
            report.push('\n');
            results.push((part, exits_1, r));
        }
    }
    // Logs gathered after the rules were last tuned: an out-of-sample
    // figure, printed with its misses (they are for the next tuning) and
    // not held to the bar.
    let fresh: Vec<Case> = load_dir("fresh")
        .into_iter()
        .filter(|c| c.unusable.is_none() && seen.insert(c.log.clone()))
        .collect();
    if !fresh.is_empty() {
        let fresh: Vec<&Case> = fresh.iter().collect();
        let r = run(&rules, &fresh, false);
        report.push_str(
            &r.score
                .table("fresh part (not tuned on), realistic exit codes"),
        );
        report.push_str(&format!(
            "failures judged healthy: {}\nmisses:\n  {}\n",
            r.health.0,
            r.score.misses.join("\n  ")
        ));
    }
    println!("{report}");
    for (part, exits_1, r) in &results {
        assert_eq!(r.health.0, 0, "{part}: failures judged healthy\n{report}");
        let healthy_failed = r.health.1 as f64 / r.health.2.max(1) as f64;
        assert!(
            healthy_failed <= MAX_HEALTHY_JUDGED_FAILED,
            "{part}: {healthy_failed:.2} of healthy runs judged failed\n{report}"
        );
        if *part == "held-out part" && !exits_1 {
            assert!(
                r.score.accuracy() >= MIN_HELD_OUT_ACCURACY,
                "{part}: accuracy {:.3} below {MIN_HELD_OUT_ACCURACY}\n{report}",
                r.score.accuracy()
            );
        }
    }
}

#[test]
fn every_case_names_its_source_and_a_known_label() {
    let known = [
        HEALTHY,
        "cuda-oom",
        "oom-killed",
        "nccl",
        "rendezvous",
        "port-in-use",
        "gpu-unavailable",
        "cuda-error",
        "data",
        "nan-loss",
        "module-not-found",
        "disk-full",
        "image-pull",
        "scheduling",
        "crash-loop",
        "segfault",
        "network",
        "user-code",
    ];
    let cases = load();
    for c in cases.iter().chain(&load_dir("fresh")) {
        assert!(known.contains(&c.label.as_str()), "{}: {}", c.name, c.label);
        assert!(c.log.lines().count() >= 2, "{}: too short", c.name);
    }
    let held = cases.iter().filter(|c| c.held_out).count();
    assert!(
        held * 4 >= cases.len(),
        "{held} of {} held out",
        cases.len()
    );
}
