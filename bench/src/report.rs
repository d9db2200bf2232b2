//! The results: one row per figure, printed as a table or JSON.

use std::fmt::Write as _;

use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum Target {
    AtMost(f64),
    AtLeast(f64),
}

impl Target {
    pub fn met(self, v: f64) -> bool {
        match self {
            Target::AtMost(t) => v <= t,
            Target::AtLeast(t) => v >= t,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub scenario: &'static str,
    pub backend: &'static str,
    pub figure: String,
    pub value: f64,
    pub unit: &'static str,
    /// None: a figure reported for context, without a target.
    pub target: Option<Target>,
    /// "pass", "miss" or "info".
    pub result: &'static str,
    pub note: String,
}

impl Row {
    pub fn new(
        scenario: &'static str,
        backend: &'static str,
        figure: impl Into<String>,
        value: f64,
        unit: &'static str,
        target: Option<Target>,
    ) -> Self {
        let result = match target {
            Some(t) if t.met(value) => "pass",
            Some(_) => "miss",
            None => "info",
        };
        Row {
            scenario,
            backend,
            figure: figure.into(),
            value,
            unit,
            target,
            result,
            note: String::new(),
        }
    }

    pub fn info(
        scenario: &'static str,
        backend: &'static str,
        figure: impl Into<String>,
        value: f64,
        unit: &'static str,
    ) -> Self {
        Self::new(scenario, backend, figure, value, unit, None)
    }

    pub fn with_note(mut self, note: impl Into<String>) -> Self {
        self.note = note.into();
        self
    }

    /// Marks the row missed whatever its value (the run did not complete).
    pub fn missed(mut self, why: impl Into<String>) -> Self {
        self.result = "miss";
        self.note = why.into();
        self
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub profile: &'static str,
}

impl Machine {
    pub fn detect() -> Self {
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".into());
        Machine {
            cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            cpu_model,
            profile: if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub machine: Machine,
    pub results: Vec<Row>,
    /// Scenarios or backends that did not run, and why.
    pub skipped: Vec<String>,
}

impl Report {
    pub fn any_missed(&self) -> bool {
        self.results.iter().any(|r| r.result == "miss")
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    pub fn to_table(&self) -> String {
        let mut out = String::new();
        let m = &self.machine;
        let _ = writeln!(
            out,
            "trainmesh-bench: {} CPU(s), {}, {} build",
            m.cpus, m.cpu_model, m.profile
        );
        if m.profile == "debug" {
            let _ = writeln!(
                out,
                "WARNING: debug build; rebuild with --release for figures worth comparing"
            );
        }
        let header = ["scenario", "backend", "figure", "value", "target", "result"];
        let cells: Vec<[String; 6]> = self
            .results
            .iter()
            .map(|r| {
                [
                    r.scenario.to_owned(),
                    r.backend.to_owned(),
                    r.figure.clone(),
                    format_value(r.value, r.unit),
                    r.target
                        .map(|t| match t {
                            Target::AtMost(v) => format!("<= {}", format_value(v, r.unit)),
                            Target::AtLeast(v) => format!(">= {}", format_value(v, r.unit)),
                        })
                        .unwrap_or_else(|| "-".into()),
                    r.result.to_owned(),
                ]
            })
            .collect();
        let mut width = header.map(str::len);
        for row in &cells {
            for (w, c) in width.iter_mut().zip(row) {
                *w = (*w).max(c.chars().count());
            }
        }
        let line = |out: &mut String, row: [&str; 6]| {
            let mut s = String::new();
            for (i, (c, w)) in row.iter().zip(width).enumerate() {
                // Numbers right-aligned, text left-aligned.
                if i == 3 {
                    let _ = write!(s, "{c:>w$}  ");
                } else {
                    let _ = write!(s, "{c:<w$}  ");
                }
            }
            let _ = writeln!(out, "{}", s.trim_end());
        };
        line(&mut out, header);
        for (row, r) in cells.iter().zip(&self.results) {
            line(&mut out, row.each_ref().map(String::as_str));
            if !r.note.is_empty() {
                let _ = writeln!(out, "    ↳ {}", r.note);
            }
        }
        for s in &self.skipped {
            let _ = writeln!(out, "skipped: {s}");
        }
        out
    }
}

fn format_value(v: f64, unit: &str) -> String {
    let n = if v.abs() >= 100.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    };
    if unit.is_empty() {
        n
    } else {
        format!("{n} {unit}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_pass_or_miss_against_their_target() {
        let ok = Row::new(
            "latency",
            "sqlite",
            "p50",
            3.0,
            "ms",
            Some(Target::AtMost(5.0)),
        );
        assert_eq!(ok.result, "pass");
        let slow = Row::new(
            "create",
            "sqlite",
            "rate",
            900.0,
            "/s",
            Some(Target::AtLeast(2000.0)),
        );
        assert_eq!(slow.result, "miss");
        assert_eq!(
            Row::info("create", "sqlite", "errors", 0.0, "").result,
            "info"
        );
    }

    #[test]
    fn the_table_lists_every_row_with_its_target() {
        let report = Report {
            machine: Machine {
                cpus: 2,
                cpu_model: "test".into(),
                profile: "release",
            },
            results: vec![Row::new(
                "latency",
                "sqlite",
                "p99",
                30.5,
                "ms",
                Some(Target::AtMost(25.0)),
            )],
            skipped: vec![],
        };
        let t = report.to_table();
        assert!(t.contains("30.5 ms"), "{t}");
        assert!(t.contains("<= 25 ms"), "{t}");
        assert!(t.contains("miss"), "{t}");
        assert!(report.any_missed());
    }
}
