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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_joined_and_long_text_cut_at_a_char() {
        assert_eq!(one_line(" a\n  b\tc "), "a b c");
        assert_eq!(truncate("héllo", 5), "héllo");
        assert_eq!(truncate("héllo wörld", 4), "hél…");
    }
}
