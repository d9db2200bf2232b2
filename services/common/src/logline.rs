//! Which lines of a job's log tell what went wrong. The same test decides
//! which lines job-service keeps from the middle of a log too long to store
//! whole, and which lines the diagnosis puts in its log window, so what one
//! keeps the other can use.

/// Words that mark a line as telling (case-insensitive, anywhere in the
/// line).
const ANYWHERE: [&str; 11] = [
    "error",
    "exception",
    "traceback",
    "nccl",
    "cuda",
    "killed",
    "fatal",
    "segmentation",
    "timeout",
    "timed out",
    "assert",
];

/// A line that mentions an error, a crash, a kill, a timeout, CUDA or NCCL,
/// an OOM or a NaN. `oom` counts only at the start of a word and `nan` only
/// as a word, so `bloom`, `room` and `nanoseconds` do not.
pub fn is_notable(text: &str) -> bool {
    let lower = text.to_ascii_lowercase();
    ANYWHERE.iter().any(|w| lower.contains(w))
        || word_at(&lower, "oom", false)
        || word_at(&lower, "nan", true)
}

/// `word` at the start of a word of `s`; when `whole`, also ending one.
fn word_at(s: &str, word: &str, whole: bool) -> bool {
    let bytes = s.as_bytes();
    let is_word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    s.match_indices(word).any(|(i, _)| {
        let starts = i == 0 || !is_word(bytes[i - 1]);
        let end = i + word.len();
        let ends = end == bytes.len() || !is_word(bytes[end]);
        starts && (!whole || ends)
    })
}

#[cfg(test)]
mod tests {
    use super::is_notable;

    #[test]
    fn error_lines_are_notable_and_word_aware() {
        for yes in [
            "ERROR x",
            "ModuleNotFoundError: No module named 'x'",
            "Killed",
            "loss: NaN",
            "OOMKilled",
            "oom-kill event",
            "Segmentation fault (core dumped)",
            "Watchdog caught collective operation timeout",
            "cuda:0",
            "Assertion `srcIndex < srcSelectDimSize` failed.",
        ] {
            assert!(is_notable(yes), "{yes}");
        }
        for no in [
            "loading bigscience/bloom",
            "nanoseconds",
            "step 3 loss 0.5",
            "the room is full",
        ] {
            assert!(!is_notable(no), "{no}");
        }
    }
}
