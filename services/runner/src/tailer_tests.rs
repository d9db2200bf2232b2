use std::io::Write;

use super::*;

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn file(&self) -> PathBuf {
        self.dir.path().join("metrics.jsonl")
    }
    fn cursor(&self) -> PathBuf {
        self.dir.path().join("metrics.cursor")
    }
    fn tailer(&self) -> Tailer {
        Tailer::open(self.file(), self.cursor())
    }
    fn append(&self, text: &str) {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.file())
            .unwrap();
        f.write_all(text.as_bytes()).unwrap();
    }
}

/// Polls and commits until nothing is left; every record shipped.
fn drain(t: &mut Tailer, limits: Limits) -> Vec<String> {
    let mut out = Vec::new();
    while let Some(b) = t.poll(limits, false).unwrap() {
        out.extend(b.records.iter().cloned());
        t.commit(&b).unwrap();
    }
    out
}

#[test]
fn missing_file_yields_nothing() {
    let fx = Fixture::new();
    assert_eq!(fx.tailer().poll(Limits::default(), false).unwrap(), None);
}

#[test]
fn partial_last_line_waits_for_its_newline() {
    let fx = Fixture::new();
    let mut t = fx.tailer();
    fx.append("{\"step\":1,\"loss\":0.5}\n{\"step\":2,");
    let b = t.poll(Limits::default(), false).unwrap().unwrap();
    assert_eq!(b.records, ["{\"step\":1,\"loss\":0.5}"]);
    t.commit(&b).unwrap();
    assert_eq!(t.poll(Limits::default(), false).unwrap(), None);

    fx.append("\"loss\":0.4}\n");
    let b = t.poll(Limits::default(), false).unwrap().unwrap();
    assert_eq!(b.records, ["{\"step\":2,\"loss\":0.4}"]);
    t.commit(&b).unwrap();
}

#[test]
fn partial_last_line_counts_once_the_writer_has_exited() {
    let fx = Fixture::new();
    let t = fx.tailer();
    fx.append("{\"step\":1,\"loss\":0.5}");
    assert_eq!(t.poll(Limits::default(), false).unwrap(), None);
    let b = t.poll(Limits::default(), true).unwrap().unwrap();
    assert_eq!(b.records, ["{\"step\":1,\"loss\":0.5}"]);
}

#[test]
fn reads_only_new_bytes() {
    let fx = Fixture::new();
    let mut t = fx.tailer();
    fx.append("{\"step\":1}\n");
    let b = t.poll(Limits::default(), false).unwrap().unwrap();
    assert_eq!(b.next.offset, 11);
    t.commit(&b).unwrap();
    fx.append("{\"step\":2}\n");
    let b = t.poll(Limits::default(), false).unwrap().unwrap();
    assert_eq!(b.records, ["{\"step\":2}"]);
    assert_eq!(b.next.offset, 22);
    assert!(!b.restarted);
}

#[test]
fn uncommitted_batch_is_read_again() {
    let fx = Fixture::new();
    let t = fx.tailer();
    fx.append("{\"step\":1}\n");
    let first = t.poll(Limits::default(), false).unwrap().unwrap();
    let again = t.poll(Limits::default(), false).unwrap().unwrap();
    assert_eq!(first, again);
}

#[test]
fn batches_respect_the_line_limit() {
    let fx = Fixture::new();
    let mut t = fx.tailer();
    for i in 0..25 {
        fx.append(&format!("{{\"step\":{i}}}\n"));
    }
    let limits = Limits {
        max_lines: 10,
        ..Limits::default()
    };
    let b = t.poll(limits, false).unwrap().unwrap();
    assert_eq!(b.records.len(), 10);
    t.commit(&b).unwrap();
    let rest = drain(&mut t, limits);
    assert_eq!(rest.len(), 15);
    assert_eq!(rest[0], "{\"step\":10}");
}

#[test]
fn invalid_lines_are_skipped_and_passed() {
    let fx = Fixture::new();
    let mut t = fx.tailer();
    fx.append("not json\n\n42\n{\"step\":1}\n");
    let b = t.poll(Limits::default(), false).unwrap().unwrap();
    assert_eq!(b.records, ["{\"step\":1}"]);
    assert_eq!(b.skipped, 2);
    t.commit(&b).unwrap();
    assert_eq!(t.poll(Limits::default(), false).unwrap(), None);
}

#[test]
fn over_long_lines_are_skipped() {
    let fx = Fixture::new();
    let mut t = fx.tailer();
    let long = format!("{{\"x\":\"{}\"}}\n", "a".repeat(100));
    fx.append(&long);
    fx.append("{\"step\":1}\n");
    let limits = Limits {
        max_line_bytes: 50,
        ..Limits::default()
    };
    let b = t.poll(limits, false).unwrap().unwrap();
    assert_eq!(b.records, ["{\"step\":1}"]);
    assert_eq!(b.skipped, 1);
    t.commit(&b).unwrap();
    assert_eq!(t.poll(limits, false).unwrap(), None);
}

#[test]
fn truncation_restarts_at_zero() {
    let fx = Fixture::new();
    let mut t = fx.tailer();
    fx.append("{\"step\":1}\n{\"step\":2}\n");
    drain(&mut t, Limits::default());
    // Truncate in place (same inode) and write less than before.
    std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(fx.file())
        .unwrap();
    fx.append("{\"step\":9}\n");
    let b = t.poll(Limits::default(), false).unwrap().unwrap();
    assert!(b.restarted);
    assert_eq!(b.records, ["{\"step\":9}"]);
}

#[test]
fn replacement_with_a_new_inode_restarts_at_zero() {
    let fx = Fixture::new();
    let mut t = fx.tailer();
    fx.append("{\"step\":1}\n{\"step\":2}\n{\"step\":3}\n");
    drain(&mut t, Limits::default());
    // Rotate: the old file moves away, a new one (new inode) takes its
    // place and is already longer than the old offset.
    std::fs::rename(fx.file(), fx.dir.path().join("metrics.jsonl.1")).unwrap();
    fx.append("{\"step\":4}\n{\"step\":5}\n{\"step\":6}\n{\"step\":7}\n");
    let b = t.poll(Limits::default(), false).unwrap().unwrap();
    assert!(b.restarted);
    assert_eq!(b.records.len(), 4);
    assert_eq!(b.records[0], "{\"step\":4}");
}

#[test]
fn each_line_is_shipped_once_across_a_restart_from_the_persisted_cursor() {
    let fx = Fixture::new();
    let mut shipped = Vec::new();
    fx.append("{\"step\":1}\n{\"step\":2}\n{\"step\":3}");
    {
        let mut t = fx.tailer();
        shipped.extend(drain(&mut t, Limits::default()));
        // A batch read but never acknowledged (the runner died mid-call).
        fx.append("\n{\"step\":4}\n");
        let unacked = t.poll(Limits::default(), false).unwrap().unwrap();
        assert_eq!(unacked.records.len(), 2);
    }
    fx.append("{\"step\":5}\n");
    let mut t = fx.tailer();
    assert_eq!(t.cursor().offset, 22);
    shipped.extend(drain(&mut t, Limits::default()));
    let expected: Vec<String> = (1..=5).map(|i| format!("{{\"step\":{i}}}")).collect();
    assert_eq!(shipped, expected);
}

#[test]
fn corrupt_cursor_file_starts_over() {
    let fx = Fixture::new();
    std::fs::write(fx.cursor(), "garbage").unwrap();
    fx.append("{\"step\":1}\n");
    let t = fx.tailer();
    assert_eq!(t.cursor(), Cursor::default());
    assert_eq!(
        t.poll(Limits::default(), false)
            .unwrap()
            .unwrap()
            .records
            .len(),
        1
    );
}

#[test]
fn python_nan_and_infinity_are_records() {
    assert!(is_json_object(r#"{"step": 1, "loss": NaN}"#));
    assert!(is_json_object(
        r#"{"step": 1, "grad": {"norm": Infinity}, "x": -Infinity}"#
    ));
    assert!(is_json_object(r#"{"step": 1, "note": "NaN \"here\""}"#));
    assert!(!is_json_object(r#"{"step": 1, "loss": NaNx}"#));
    assert!(!is_json_object("NaN"));
    assert!(!is_json_object("[1, 2]"));
    assert!(!is_json_object(r#"{"step": 1"#));

    let fx = Fixture::new();
    fx.append("{\"step\": 7, \"loss\": NaN}\n");
    let b = fx.tailer().poll(Limits::default(), false).unwrap().unwrap();
    assert_eq!(b.records, ["{\"step\": 7, \"loss\": NaN}"]);
}
