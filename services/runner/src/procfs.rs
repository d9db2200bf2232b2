//! What the runner reads about processes from `/proc` (Linux): enough to
//! find an attempt's processes — by parent, process group or environment —
//! and to tell a process from a later one that reused its pid.

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
    // After the name: state(3) ppid(4) pgrp(5) … starttime(22).
    Some(Stat {
        pid,
        state: fields.first()?.chars().next()?,
        ppid: fields.get(1)?.parse().ok()?,
        pgrp: fields.get(2)?.parse().ok()?,
        start: fields.get(19)?.parse().ok()?,
    })
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
            }
        );
        assert!(parse_stat("garbage").is_none());
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
