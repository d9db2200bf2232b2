//! Python tracebacks in a job's log: the last exception, its type,
//! message and the whole chain as Python printed it. Pure text work, unit
//! tested with real logs (`job_error_tests.rs`).

/// A Python exception found in a log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PythonException {
    /// e.g. `RuntimeError`, `torch.cuda.OutOfMemoryError`.
    pub type_name: String,
    /// The text after `Type: `; empty when the exception had none.
    pub message: String,
    /// From the first `Traceback (most recent call last):` of the final
    /// exception's chain to its exception line, inclusive.
    pub traceback: String,
}

const TRACEBACK_HEADER: &str = "Traceback (most recent call last):";
const CHAIN_MARKERS: [&str; 2] = [
    "During handling of the above exception, another exception occurred:",
    "The above exception was the direct cause of the following exception:",
];

/// Finds the last Python traceback in `log`.
///
/// Lines may carry a common prefix (torchrun writes `[rank0]: `): the
/// prefix in front of the header is stripped from the lines that follow,
/// and lines without it (other ranks) are skipped. A SyntaxError raised
/// for the main script has no header; its `File "…", line N` block is
/// recognised too.
pub fn last_python_traceback(log: &str) -> Option<PythonException> {
    let lines: Vec<&str> = log.lines().collect();
    let header_at = lines.iter().rposition(|l| l.contains(TRACEBACK_HEADER));
    match header_at.and_then(|i| parse_from_header(&lines, i)) {
        // A header-less SyntaxError printed after the last traceback wins.
        Some((exc, end)) => bare_syntax_error(&lines[end + 1..]).or(Some(exc)),
        None => bare_syntax_error(&lines),
    }
}

/// Parses the traceback whose header is `lines[at]`; also returns the
/// index of its exception line.
fn parse_from_header(lines: &[&str], at: usize) -> Option<(PythonException, usize)> {
    let col = lines[at].find(TRACEBACK_HEADER)?;
    let prefix = &lines[at][..col];
    // Lines after the header, prefix stripped; lines without the prefix
    // are interleaved output from another rank or process.
    let rest: Vec<(usize, &str)> = lines
        .iter()
        .enumerate()
        .skip(at + 1)
        .filter_map(|(i, l)| Some((i, l.strip_prefix(prefix)?.trim_end_matches('\r'))))
        .filter(|(_, l)| !l.is_empty())
        .collect();
    let mut body = vec![TRACEBACK_HEADER.to_owned()];
    let mut skipped_other = 0;
    for (i, &(line_no, line)) in rest.iter().enumerate() {
        if line.starts_with(char::is_whitespace) || line.starts_with('^') || line.starts_with('~') {
            body.push(line.to_owned());
            continue;
        }
        if let Some((type_name, message)) = exception_line(line) {
            body.push(line.to_owned());
            // A word-and-colon line such as `INFO: loading` between frames
            // is output, not the exception: frames continue after it.
            let frames_continue = rest
                .get(i + 1)
                .is_some_and(|(_, next)| next.starts_with(char::is_whitespace));
            if !looks_like_exception_type(&type_name) && frames_continue {
                continue;
            }
            let mut traceback = body.join("\n");
            if let Some(earlier) = chained_prefix(lines, at, prefix) {
                traceback = format!("{earlier}\n\n{traceback}");
            }
            let exc = PythonException {
                type_name,
                message,
                traceback,
            };
            return Some((exc, line_no));
        }
        // Unindented noise between frames (a stray print); give up if there
        // is much of it, since then this is not a traceback after all.
        skipped_other += 1;
        if skipped_other > 20 {
            return None;
        }
    }
    None
}

/// When the traceback at `at` follows "During handling of the above
/// exception…" or "The above exception was the direct cause…", returns the
/// earlier part of the chain (from its first header), so the traceback text
/// is the whole chain as Python printed it.
fn chained_prefix(lines: &[&str], at: usize, prefix: &str) -> Option<String> {
    let mut start = at;
    loop {
        let mut i = start;
        // Skip blank lines back to the marker.
        let marker_at = loop {
            if i == 0 {
                break None;
            }
            i -= 1;
            let l = lines[i].strip_prefix(prefix).unwrap_or(lines[i]).trim();
            if l.is_empty() {
                continue;
            }
            break CHAIN_MARKERS.contains(&l).then_some(i);
        };
        let Some(m) = marker_at else { break };
        match lines[..m]
            .iter()
            .rposition(|l| l.contains(TRACEBACK_HEADER))
        {
            Some(h) => start = h,
            None => break,
        }
    }
    if start == at {
        return None;
    }
    let text: Vec<&str> = lines[start..at]
        .iter()
        .map(|l| l.strip_prefix(prefix).unwrap_or(l).trim_end_matches('\r'))
        .collect();
    Some(text.join("\n").trim_end().to_owned())
}

fn looks_like_exception_type(type_name: &str) -> bool {
    let short = type_name.rsplit('.').next().unwrap_or(type_name);
    [
        "Error",
        "Exception",
        "Interrupt",
        "Exit",
        "Iteration",
        "Warning",
        "Failure",
        "Fault",
    ]
    .iter()
    .any(|s| short.ends_with(s))
}

/// `Type: message`, `pkg.mod.Type: message` or a bare `Type`.
fn exception_line(line: &str) -> Option<(String, String)> {
    let (type_name, message) = match line.split_once(':') {
        Some((t, m)) => (t, m.strip_prefix(' ').unwrap_or(m)),
        None => (line.trim_end(), ""),
    };
    let valid = !type_name.is_empty()
        && type_name.split('.').all(|part| {
            let mut chars = part.chars();
            chars
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        });
    // A bare word is only an exception line if it looks like one, so that a
    // stray `Done` is not taken for an exception type.
    let bare_ok = !line.contains(':') && looks_like_exception_type(type_name);
    (valid && (line.contains(':') || bare_ok)).then(|| (type_name.to_owned(), message.to_owned()))
}

/// A SyntaxError (or IndentationError/TabError) of the main script, which
/// Python prints without a `Traceback` header.
fn bare_syntax_error(lines: &[&str]) -> Option<PythonException> {
    let end = lines.iter().rposition(|l| {
        exception_line(l.trim_end_matches('\r')).is_some_and(|(t, _)| {
            t.ends_with("SyntaxError") || t.ends_with("IndentationError") || t.ends_with("TabError")
        })
    })?;
    let mut start = end;
    while start > 0 {
        let prev = lines[start - 1];
        if prev.starts_with(char::is_whitespace) && !prev.trim().is_empty() {
            start -= 1;
        } else {
            break;
        }
    }
    if start == end || !lines[start].trim_start().starts_with("File \"") {
        return None;
    }
    let (type_name, message) = exception_line(lines[end].trim_end_matches('\r'))?;
    let traceback = lines[start..=end]
        .iter()
        .map(|l| l.trim_end_matches('\r'))
        .collect::<Vec<_>>()
        .join("\n");
    Some(PythonException {
        type_name,
        message,
        traceback,
    })
}
