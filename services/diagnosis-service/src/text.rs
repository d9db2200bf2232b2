//! Shaping text for a person or a prompt: one line, a bounded length.

/// One line: newlines and runs of blanks become single spaces.
pub fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// At most `max` characters, the last of them `…` when cut.
pub fn truncate(s: &str, max: usize) -> String {
    let s = s.trim_end();
    if s.chars().count() <= max {
        return s.to_owned();
    }
    let mut t: String = s.chars().take(max.saturating_sub(1)).collect();
    t.push('…');
    t
}

/// "2h40m", "45m", "30s".
pub fn duration(d: std::time::Duration) -> String {
    let s = d.as_secs();
    match (s / 3600, s % 3600 / 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, 0) => format!("{m}m"),
        (0, m, s) => format!("{m}m{s}s"),
        (h, 0, _) => format!("{h}h"),
        (h, m, _) => format!("{h}h{m}m"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_joined_and_long_text_cut_at_a_char() {
        assert_eq!(one_line(" a\n  b\tc "), "a b c");
        assert_eq!(truncate("héllo", 5), "héllo");
        assert_eq!(truncate("héllo wörld", 4), "hél…");
        let secs = std::time::Duration::from_secs;
        assert_eq!(duration(secs(30)), "30s");
        assert_eq!(duration(secs(2700)), "45m");
        assert_eq!(duration(secs(9600)), "2h40m");
        assert_eq!(duration(secs(7200)), "2h");
    }
}
