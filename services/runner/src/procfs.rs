//! What the runner reads about processes from `/proc` (Linux): enough to
//! find an attempt's processes — by parent, process group or environment —
//! to tell a process from a later one that reused its pid, and to measure
//! the memory they hold.

use std::path::Path;

/// The fields of `/proc/<pid>/stat` the runner uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    pub pid: i32,
    /// `R`, `S`, `Z`, …
    pub state: char,
    pub ppid: i32,
    pub pgrp: i32,
    /// Clock ticks after boot: with the pid, the identity of a process
    /// (a reused pid starts later).
    pub start: u64,
    /// Resident set size, in pages.
    pub rss_pages: u64,
}

impl Stat {
    /// A zombie or dead process is gone for every purpose here: it runs
    /// nothing, and an init that does not reap would keep it forever.
    pub fn is_live(&self) -> bool {
        !matches!(self.state, 'Z' | 'X' | 'x')
    }
}

/// `/proc/<pid>/stat`, when the process exists.
pub fn stat(pid: i32) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Parses a `stat` line. The command name may hold spaces and parentheses:
/// the fields that follow start after the last `)`.
pub fn parse_stat(line: &str) -> Option<Stat> {
    let pid = line.split_whitespace().next()?.parse().ok()?;
    let rest = &line[line.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state(3) ppid(4) pgrp(5) … starttime(22) vsize(23)
    // rss(24).
    Some(Stat {
        pid,
        state: fields.first()?.chars().next()?,
        ppid: fields.get(1)?.parse().ok()?,
        pgrp: fields.get(2)?.parse().ok()?,
        start: fields.get(19)?.parse().ok()?,
        // Negative in some kernels' accounting races: nothing resident.
        rss_pages: fields
            .get(21)
            .and_then(|v| v.parse::<i64>().ok())
            .map_or(0, |v| u64::try_from(v).unwrap_or(0)),
    })
}

/// Bytes per page (what `rss_pages` counts).
pub fn page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(n).ok().filter(|n| *n > 0).unwrap_or(4096)
}

/// The proportional set size of `pid` in KiB (resident memory, each page
/// shared with other processes divided among them), from
/// `/proc/<pid>/smaps_rollup`; `None` when it cannot be read (gone, another
/// user's process, or a kernel before 4.14).
pub fn pss_kib(pid: i32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    parse_pss_kib(&text)
}

/// The `Pss:` line of a `smaps_rollup`.
pub fn parse_pss_kib(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
}

/// Every process visible now (those that vanish while being read are
/// left out).
pub fn all() -> Vec<Stat> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(stat)
        .collect()
}

/// Live processes below `root` (its children, theirs, …), from one scan.
pub fn descendants(root: i32, procs: &[Stat]) -> Vec<i32> {
    let mut found = Vec::new();
    let mut frontier = vec![root];
    while let Some(parent) = frontier.pop() {
        for p in procs.iter().filter(|p| p.ppid == parent && p.pid != root) {
            if !found.contains(&p.pid) {
                found.push(p.pid);
                frontier.push(p.pid);
            }
        }
    }
    found.retain(|pid| procs.iter().any(|p| p.pid == *pid && p.is_live()));
    found
}

/// Whether the environment `pid` started with holds every one of
/// `entries` (`KEY=value`). False when it cannot be read (another user's
/// process, or gone).
pub fn environ_has(pid: i32, entries: &[String]) -> bool {
    let Ok(env) = std::fs::read(Path::new("/proc").join(pid.to_string()).join("environ")) else {
        return false;
    };
    entries
        .iter()
        .all(|want| env.split(|b| *b == 0).any(|entry| entry == want.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_follow_the_last_parenthesis() {
        let line = "4242 (we ird) (name)) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 100 0";
        let s = parse_stat(line).unwrap();
        assert_eq!(
            s,
            Stat {
                pid: 4242,
                state: 'S',
                ppid: 1,
                pgrp: 4242,
                start: 987654,
                rss_pages: 100,
            }
        );
        assert!(parse_stat("garbage").is_none());
    }

    #[test]
    fn pss_is_read_from_the_rollup_and_this_process_has_some() {
        let rollup = "55d0c000-7ffd [rollup]\nRss:  2048 kB\nPss:  1536 kB\nPss_Anon: 1000 kB\n";
        assert_eq!(parse_pss_kib(rollup), Some(1536));
        assert_eq!(parse_pss_kib("Rss: 1 kB\n"), None);
        let me = std::process::id() as i32;
        assert!(stat(me).unwrap().rss_pages > 0);
        if let Some(kib) = pss_kib(me) {
            assert!(kib > 0);
        }
        assert!(page_size() >= 4096);
    }

    #[test]
    fn this_process_is_found_with_its_parent_and_environment() {
        let me = std::process::id() as i32;
        let s = stat(me).unwrap();
        assert!(s.is_live());
        assert!(s.start > 0);
        let procs = all();
        assert!(descendants(s.ppid, &procs).contains(&me));
        if let Ok(path) = std::env::var("PATH") {
            assert!(environ_has(me, &[format!("PATH={path}")]));
        }
        assert!(!environ_has(me, &["TRAINMESH_NO_SUCH_VARIABLE=1".into()]));
    }
}
