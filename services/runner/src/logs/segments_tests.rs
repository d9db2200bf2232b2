use std::time::Duration;

use super::*;
use crate::logs::{LogWriter, OutputSink};

/// 1 KiB segments, `output.log` and one rotated file.
const TINY: LogLimits = LogLimits {
    max_bytes: 2048,
    files: 2,
};

/// `line 0000`…: 10 bytes with the newline, 102 to a segment.
fn line(i: u64) -> String {
    format!("line {i:04}")
}

async fn write(sink: &OutputSink, lines: std::ops::Range<u64>) {
    for i in lines {
        sink.line(line(i)).await;
    }
}

async fn wait_for_lines(writer: &LogWriter, n: u64) {
    let mut progress = writer.progress.clone();
    tokio::time::timeout(Duration::from_secs(10), progress.wait_for(|p| p.lines >= n))
        .await
        .expect("the writer did not catch up in time")
        .unwrap();
}

/// Everything readable from `at` on: (number, text) pairs, the cursor
/// after them, and the lines reported skipped.
fn read_all(files: &LogFiles, mut at: Cursor) -> (Vec<(u64, String)>, Cursor, u64) {
    let (mut got, mut skipped) = (Vec::new(), 0);
    loop {
        let b = files.read(at, 7, 1 << 20).unwrap();
        skipped += b.skipped;
        if b.lines.is_empty() && b.next == at {
            return (got, at, skipped);
        }
        let seg = files
            .segments()
            .into_iter()
            .find(|s| s.first_line <= b.first_line && b.first_line < s.first_line + s.lines)
            .unwrap();
        assert!(
            b.next.line <= seg.first_line + seg.lines,
            "a batch spans two segments"
        );
        got.extend((b.first_line..).zip(b.lines));
        at = b.next;
    }
}

fn on_disk(dir: &std::path::Path) -> Vec<(String, u64)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name, e.metadata().unwrap().len())
        })
        .collect();
    files.sort();
    files
}

#[tokio::test]
async fn writer_rotates_within_the_cap_and_keeps_the_newest_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("output.log");
    let (sink, mut writer) = LogWriter::start(&path, TINY).await.unwrap();
    write(&sink, 0..1000).await;
    drop(sink);
    writer.finished().await;

    // 1000 lines of 10 bytes in segments of 102 lines: nine rotations.
    let files = on_disk(dir.path());
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["output.log", "output.log.9"]);
    let total: u64 = files.iter().map(|(_, len)| len).sum();
    assert!(total <= TINY.max_bytes, "{total} bytes on disk");

    let kept = std::fs::read_to_string(dir.path().join("output.log.9")).unwrap()
        + &std::fs::read_to_string(&path).unwrap();
    let first = 1000 - kept.lines().count() as u64;
    let expected: Vec<String> = (first..1000).map(line).collect();
    assert_eq!(kept.lines().collect::<Vec<_>>(), expected);

    let progress = *writer.progress.borrow();
    assert_eq!(progress.lines, 1000);
    assert_eq!(progress.bytes, 10_000);
    let segments = writer.files.segments();
    assert_eq!(segments.len(), 2);
    assert_eq!(segments[0].first_line, first + 1);
    assert_eq!(segments[0].first_byte, first * 10);
    assert_eq!(
        segments[1].first_line,
        segments[0].first_line + segments[0].lines
    );
    assert_eq!(writer.tail().last().map(String::as_str), Some("line 0999"));
}

#[tokio::test]
async fn a_reader_that_keeps_up_gets_every_line_with_its_number() {
    let dir = tempfile::tempdir().unwrap();
    let (sink, writer) = LogWriter::start(&dir.path().join("output.log"), TINY)
        .await
        .unwrap();
    let mut at = Cursor::default();
    let mut got = Vec::new();
    // 45 lines a round: at most one rotation between two reads, so the
    // segment being read is always still there.
    for round in 0..20 {
        write(&sink, round * 45..(round + 1) * 45).await;
        wait_for_lines(&writer, (round + 1) * 45).await;
        let (lines, next, skipped) = read_all(&writer.files, at);
        assert_eq!(skipped, 0);
        got.extend(lines);
        at = next;
    }
    assert!(writer.files.segments()[0].first_line > 1, "never rotated");
    let expected: Vec<(u64, String)> = (0..900).map(|i| (i + 1, line(i))).collect();
    assert_eq!(got, expected);
    assert_eq!(
        at,
        Cursor {
            byte: 9000,
            line: 901
        }
    );
}

#[tokio::test]
async fn a_reader_that_fell_behind_skips_to_the_oldest_kept_segment() {
    let dir = tempfile::tempdir().unwrap();
    let (sink, mut writer) = LogWriter::start(&dir.path().join("output.log"), TINY)
        .await
        .unwrap();
    write(&sink, 0..20).await;
    wait_for_lines(&writer, 20).await;
    let (early, at, _) = read_all(&writer.files, Cursor::default());
    assert_eq!(early.len(), 20);

    // The reader stalls (job-service unreachable) while the job writes on.
    write(&sink, 20..1000).await;
    drop(sink);
    writer.finished().await;
    let oldest = writer.files.segments()[0].clone();
    assert!(oldest.first_line > 21);

    let b = writer.files.read(at, 5, 1 << 20).unwrap();
    assert_eq!(b.skipped, oldest.first_line - 21);
    assert_eq!(b.first_line, oldest.first_line);
    assert_eq!(b.lines[0], line(oldest.first_line - 1));

    let (rest, end, skipped) = read_all(&writer.files, at);
    assert_eq!(skipped, oldest.first_line - 21);
    let expected: Vec<(u64, String)> = (oldest.first_line - 1..1000)
        .map(|i| (i + 1, line(i)))
        .collect();
    assert_eq!(rest, expected);
    assert_eq!(
        end,
        Cursor {
            byte: 10_000,
            line: 1001
        }
    );
}

#[tokio::test]
async fn classification_tail_spans_a_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let (sink, mut writer) = LogWriter::start(&dir.path().join("output.log"), TINY)
        .await
        .unwrap();
    // Fill the first segment to its last byte with the start of a traceback,
    // so its end lands in the next one.
    write(&sink, 0..99).await; // 990 bytes
    sink.line("Traceback:").await; // 1001
    sink.line("  File \"train.py\"").await; // 1019
    sink.line("OOM").await; // 1023
    sink.line("torch.OutOfMemoryError: CUDA out of memory")
        .await;
    drop(sink);
    writer.finished().await;
    let segments = writer.files.segments();
    assert_eq!(segments.len(), 2);
    assert_eq!((segments[0].bytes, segments[1].lines), (1023, 1));

    let tail = writer.files.tail_text(80);
    assert_eq!(
        tail,
        "Traceback:\n  File \"train.py\"\nOOM\ntorch.OutOfMemoryError: CUDA out of memory\n"
    );
    let all = writer.files.tail_text(1 << 20);
    assert!(all.starts_with("line 0000\n") && all.ends_with("CUDA out of memory\n"));
}

#[test]
fn tail_text_of_a_missing_file_is_empty() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("output.log");
    let (files, _) = LogFiles::create(&path, TINY).unwrap();
    files.record(1, 6);
    std::fs::remove_file(&path).unwrap();
    assert_eq!(files.tail_text(10), "");
}

#[test]
fn creating_the_log_removes_an_earlier_runs_segments() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("output.log");
    for name in [
        "output.log",
        "output.log.3",
        "output.log.x",
        "metrics.jsonl",
    ] {
        std::fs::write(dir.path().join(name), "old\n").unwrap();
    }
    let (files, _) = LogFiles::create(&path, TINY).unwrap();
    let names: Vec<String> = on_disk(dir.path()).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["metrics.jsonl", "output.log", "output.log.x"]);
    assert_eq!(std::fs::read(&path).unwrap(), b"");
    assert_eq!(files.segments().len(), 1);
}

#[test]
fn read_lines_stops_at_limits_and_partial_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("output.log");
    std::fs::write(&path, "one\ntwo\nthree\nfour").unwrap();
    let open = || File::open(&path).unwrap();
    let (lines, end) = read_lines(open(), 0, 18, 2, 1024).unwrap();
    assert_eq!(lines, ["one", "two"]);
    assert_eq!(end, 8);
    let (lines, end) = read_lines(open(), end, 18, 10, 1024).unwrap();
    assert_eq!(lines, ["three"]);
    assert_eq!(end, 14);
}

#[test]
fn segment_size_divides_the_cap() {
    assert_eq!(LogLimits::default().segment_bytes(), 64 * 1024 * 1024);
    assert_eq!(TINY.segment_bytes(), 1024);
}
