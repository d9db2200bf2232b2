//! The log window: the few lines of a long log worth showing (to a person
//! or an LLM). Of the last [`TAIL_LINES`] lines it keeps up to
//! [`WINDOW_LINES`]: first those that mention a keyword (error, exception,
//! traceback, nccl, cuda, oom, killed, nan, fatal, segmentation, timeout),
//! then the most recent others to fill the window, in original order with
//! their line numbers.

use crate::domain::LogLine;

/// Lines of the log tail that are considered.
pub const TAIL_LINES: usize = 1000;
/// Lines in the window.
pub const WINDOW_LINES: usize = 60;

/// The same test job-service uses to keep telling lines of a log too long
/// to store whole.
pub fn is_keyword_line(text: &str) -> bool {
    trainmesh_common::logline::is_notable(text)
}

/// The window of `lines` (in log order), at most `size` lines.
///
/// When more than `size` lines match keywords, the first third of the slots
/// go to the earliest matches (where a root cause usually is) and the rest
/// to the latest ones (the final error).
pub fn window(lines: &[LogLine], size: usize) -> Vec<LogLine> {
    let tail = &lines[lines.len().saturating_sub(TAIL_LINES)..];
    if tail.len() <= size {
        return tail.to_vec();
    }
    let matches: Vec<usize> = (0..tail.len())
        .filter(|&i| is_keyword_line(&tail[i].text))
        .collect();
    let mut keep = vec![false; tail.len()];
    if matches.len() > size {
        let early = size / 3;
        let late = size - early;
        for &i in matches[..early]
            .iter()
            .chain(&matches[matches.len() - late..])
        {
            keep[i] = true;
        }
    } else {
        for &i in &matches {
            keep[i] = true;
        }
        let mut free = size - matches.len();
        for i in (0..tail.len()).rev() {
            if free == 0 {
                break;
            }
            if !keep[i] {
                keep[i] = true;
                free -= 1;
            }
        }
    }
    tail.iter()
        .zip(keep)
        .filter(|(_, k)| *k)
        .map(|(l, _)| l.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(texts: &[&str]) -> Vec<LogLine> {
        texts
            .iter()
            .enumerate()
            .map(|(i, t)| LogLine::new(i as i64 + 1, *t))
            .collect()
    }

    fn numbered(n: usize, f: impl Fn(usize) -> String) -> Vec<LogLine> {
        (1..=n).map(|i| LogLine::new(i as i64, f(i))).collect()
    }

    #[test]
    fn short_logs_are_kept_whole() {
        let l = log(&["a", "b"]);
        assert_eq!(window(&l, 60), l);
    }

    #[test]
    fn keyword_lines_are_kept_and_recent_lines_fill_in_order() {
        let lines = numbered(500, |i| match i {
            10 => "Traceback (most recent call last):".into(),
            20 => "RuntimeError: CUDA out of memory".into(),
            30 => "NCCL WARN something".into(),
            _ => format!("step {i} loss=0.{i}"),
        });
        let w = window(&lines, 10);
        let nums: Vec<i64> = w.iter().map(|l| l.number).collect();
        assert_eq!(nums, [10, 20, 30, 494, 495, 496, 497, 498, 499, 500]);
        assert_eq!(w[1].text, "RuntimeError: CUDA out of memory");
    }

    #[test]
    fn only_the_last_thousand_lines_are_considered() {
        let lines = numbered(3000, |i| {
            if i == 5 {
                "fatal error early".into()
            } else {
                format!("line {i}")
            }
        });
        let w = window(&lines, 60);
        assert_eq!(w.len(), 60);
        assert!(w.iter().all(|l| l.number > 2000));
        assert_eq!(w.last().map(|l| l.number), Some(3000));
    }

    #[test]
    fn with_too_many_matches_earliest_and_latest_are_kept() {
        let lines = numbered(1000, |i| format!("[rank{}] NCCL timeout at {i}", i % 8));
        let w = window(&lines, 60);
        assert_eq!(w.len(), 60);
        assert_eq!(w[0].number, 1);
        assert_eq!(w[19].number, 20);
        assert_eq!(w[20].number, 961);
        assert_eq!(w[59].number, 1000);
        assert!(w.windows(2).all(|p| p[0].number < p[1].number));
    }
}
