//! JSON metric records, as a job writes them to `$TRAINMESH_METRICS_FILE`.
//!
//! A record is one JSON object:
//!
//! - the step is `step`, or `global_step`, or `iteration` (the first present,
//!   in that order): an integer ≥ 0 (`3.0` is accepted, `3.5` is not);
//! - the time is `timestamp`, or `time`: seconds since the epoch (a number,
//!   fractions allowed) or an RFC 3339 string; absent means "now";
//! - every other numeric leaf is a point; nested objects are flattened with
//!   `.` (`{"reward": {"mean": 1}}` → `reward.mean`);
//! - the strings `"NaN"`, `"Infinity"`, `"-Infinity"` (also `inf`/`-inf`,
//!   any case) are values; other strings, booleans, nulls and arrays are
//!   ignored;
//! - Python's `json.dumps` writes non-finite floats as bare `NaN`,
//!   `Infinity`, `-Infinity`, which is not JSON; those records are accepted
//!   too, because a NaN loss is exactly the point a user needs to see;
//! - a blank record is skipped.

use crate::domain::{MetricKey, Point};

const STEP_KEYS: [&str; 3] = ["step", "global_step", "iteration"];
const TIME_KEYS: [&str; 2] = ["timestamp", "time"];

/// Appends the points of `record` to `out`; the error describes what is
/// wrong (the caller names the record).
pub fn parse_record(record: &str, now_micros: i64, out: &mut Vec<Point>) -> Result<(), String> {
    if record.trim().is_empty() {
        return Ok(());
    }
    let value: serde_json::Value = match serde_json::from_str(record) {
        Ok(v) => v,
        Err(e) => match quote_bare_non_finite(record) {
            Some(fixed) => serde_json::from_str(&fixed).map_err(|_| not_json(&e))?,
            None => return Err(not_json(&e)),
        },
    };
    let serde_json::Value::Object(map) = value else {
        return Err("must be a JSON object such as {\"step\": 1, \"loss\": 0.5}".into());
    };

    let step_key = STEP_KEYS
        .iter()
        .copied()
        .find(|k| map.contains_key(*k))
        .ok_or("has no `step` (nor `global_step` or `iteration`)")?;
    let step = parse_step(step_key, &map[step_key])?;

    let mut ts = now_micros;
    if let Some((k, v)) = TIME_KEYS.iter().find_map(|k| map.get(*k).map(|v| (*k, v))) {
        if !v.is_null() {
            ts = parse_time(k, v)?;
        }
    }

    for (k, v) in &map {
        if k == step_key || TIME_KEYS.contains(&k.as_str()) {
            continue;
        }
        flatten(k.clone(), v, step, ts, out)?;
    }
    Ok(())
}

fn not_json(e: &serde_json::Error) -> String {
    format!("is not valid JSON: {e}")
}

fn parse_step(key: &str, v: &serde_json::Value) -> Result<i64, String> {
    let bad = || format!("`{key}` must be an integer ≥ 0, got {v}");
    let serde_json::Value::Number(n) = v else {
        return Err(bad());
    };
    if let Some(u) = n.as_u64() {
        return i64::try_from(u).map_err(|_| bad());
    }
    match n.as_f64() {
        Some(f) if f >= 0.0 && f.fract() == 0.0 && f < 9.0e18 => Ok(f as i64),
        _ => Err(bad()),
    }
}

fn parse_time(key: &str, v: &serde_json::Value) -> Result<i64, String> {
    let bad = || format!("`{key}` must be seconds since the epoch or an RFC 3339 time, got {v}");
    match v {
        serde_json::Value::Number(n) => match n.as_f64() {
            Some(secs) if secs.is_finite() && secs.abs() < 9.0e12 => {
                Ok((secs * 1_000_000.0).round() as i64)
            }
            _ => Err(bad()),
        },
        serde_json::Value::String(s) => chrono::DateTime::parse_from_rfc3339(s)
            .map(|t| t.timestamp_micros())
            .map_err(|_| bad()),
        _ => Err(bad()),
    }
}

fn special(s: &str) -> Option<f64> {
    match s.to_ascii_lowercase().as_str() {
        "nan" => Some(f64::NAN),
        "infinity" | "+infinity" | "inf" | "+inf" => Some(f64::INFINITY),
        "-infinity" | "-inf" => Some(f64::NEG_INFINITY),
        _ => None,
    }
}

fn flatten(
    key: String,
    v: &serde_json::Value,
    step: i64,
    ts: i64,
    out: &mut Vec<Point>,
) -> Result<(), String> {
    let value = match v {
        serde_json::Value::Number(n) => n.as_f64(),
        serde_json::Value::String(s) => special(s),
        serde_json::Value::Object(map) => {
            for (k, child) in map {
                flatten(format!("{key}.{k}"), child, step, ts, out)?;
            }
            return Ok(());
        }
        serde_json::Value::Bool(_) | serde_json::Value::Null | serde_json::Value::Array(_) => None,
    };
    if let Some(value) = value {
        let key = MetricKey::parse("json_records", &key).map_err(|e| e.description)?;
        out.push(Point {
            key,
            step,
            ts_micros: ts,
            value,
        });
    }
    Ok(())
}

/// Quotes bare `NaN`, `Infinity` and `-Infinity` tokens outside strings, so
/// Python's non-standard output parses. `None` when there is none.
fn quote_bare_non_finite(text: &str) -> Option<String> {
    const TOKENS: [&str; 3] = ["-Infinity", "Infinity", "NaN"];
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len() + 8);
    let mut in_string = false;
    let mut escaped = false;
    let mut changed = false;
    let mut i = 0;
    let mut copied = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            i += 1;
            continue;
        }
        if b == b'"' {
            in_string = true;
            i += 1;
            continue;
        }
        let token = TOKENS.iter().find(|t| {
            text[i..].starts_with(*t)
                && !bytes
                    .get(i + t.len())
                    .is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_')
        });
        if let Some(t) = token {
            out.push_str(&text[copied..i]);
            out.push('"');
            out.push_str(t);
            out.push('"');
            i += t.len();
            copied = i;
            changed = true;
            continue;
        }
        i += 1;
    }
    if !changed {
        return None;
    }
    out.push_str(&text[copied..]);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 42;

    fn parse(record: &str) -> Result<Vec<(String, i64, i64, f64)>, String> {
        let mut out = Vec::new();
        parse_record(record, NOW, &mut out)?;
        Ok(out
            .into_iter()
            .map(|p| (p.key.into_string(), p.step, p.ts_micros, p.value))
            .collect())
    }

    #[test]
    fn flat_record_with_timestamp() {
        let pts = parse(r#"{"step": 3, "loss": 0.5, "timestamp": 1700000000.5}"#).unwrap();
        assert_eq!(pts, vec![("loss".into(), 3, 1_700_000_000_500_000, 0.5)]);
    }

    #[test]
    fn nested_groups_are_flattened_with_dots() {
        let pts = parse(
            r#"{"step": 3, "reward": {"mean": 1, "std": 0.1}, "loss": {"policy": 0.2,
                "value": {"clipped": 4}}, "kl": 0.01}"#,
        )
        .unwrap();
        let keys: Vec<_> = pts.iter().map(|p| p.0.as_str()).collect();
        assert_eq!(
            keys,
            [
                "kl",
                "loss.policy",
                "loss.value.clipped",
                "reward.mean",
                "reward.std"
            ]
        );
        assert!(pts.iter().all(|p| p.1 == 3 && p.2 == NOW));
        assert_eq!(pts[3].3, 1.0);
    }

    #[test]
    fn non_numeric_leaves_are_ignored_and_special_strings_are_values() {
        let pts = parse(
            r#"{"step": 1, "phase": "train", "done": true, "lr": null, "hist": [1, 2],
                "a": "NaN", "b": "Infinity", "c": "-Infinity", "d": "-inf"}"#,
        )
        .unwrap();
        assert_eq!(pts.len(), 4);
        assert!(pts[0].3.is_nan());
        assert_eq!(pts[1].3, f64::INFINITY);
        assert_eq!(pts[2].3, f64::NEG_INFINITY);
        assert_eq!(pts[3].3, f64::NEG_INFINITY);
    }

    #[test]
    fn python_bare_nan_and_infinity_are_accepted() {
        let pts = parse(r#"{"step": 2, "loss": NaN, "grad": {"norm": Infinity}, "x": -Infinity, "note": "NaN here"}"#)
            .unwrap();
        assert_eq!(pts.len(), 3);
        assert!(pts.iter().any(|p| p.0 == "loss" && p.3.is_nan()));
        assert!(pts
            .iter()
            .any(|p| p.0 == "grad.norm" && p.3 == f64::INFINITY));
        assert!(pts.iter().any(|p| p.0 == "x" && p.3 == f64::NEG_INFINITY));
    }

    #[test]
    fn step_aliases_and_their_precedence() {
        let pts = parse(r#"{"global_step": 7, "loss": 1}"#).unwrap();
        assert_eq!(pts[0].1, 7);
        let pts = parse(r#"{"iteration": 8.0, "loss": 1}"#).unwrap();
        assert_eq!(pts[0].1, 8);
        // With `step` present, `global_step` is an ordinary metric.
        let pts = parse(r#"{"step": 1, "global_step": 9}"#).unwrap();
        assert_eq!(pts, vec![("global_step".into(), 1, NOW, 9.0)]);
    }

    #[test]
    fn time_key_and_rfc3339() {
        let pts = parse(r#"{"step": 1, "time": 2.25, "x": 1}"#).unwrap();
        assert_eq!(pts[0].2, 2_250_000);
        let pts = parse(r#"{"step": 1, "timestamp": "1970-01-01T00:00:01Z", "x": 1}"#).unwrap();
        assert_eq!(pts[0].2, 1_000_000);
    }

    #[test]
    fn bad_records_are_described() {
        for (record, needle) in [
            (r#"{"loss": 1}"#, "no `step`"),
            (r#"{"step": -1, "loss": 1}"#, "`step` must be an integer"),
            (r#"{"step": 1.5, "loss": 1}"#, "`step` must be an integer"),
            (r#"{"step": "3", "loss": 1}"#, "`step` must be an integer"),
            (
                r#"{"step": 1, "timestamp": "yesterday"}"#,
                "`timestamp` must be",
            ),
            (r#"[1, 2]"#, "must be a JSON object"),
            (r#"{"step": 1, "loss": 0.5"#, "not valid JSON"),
            ("not json", "not valid JSON"),
        ] {
            let err = parse(record).unwrap_err();
            assert!(err.contains(needle), "{record}: {err}");
        }
        let long = format!(r#"{{"step": 1, "{}": 1}}"#, "k".repeat(300));
        assert!(parse(&long).unwrap_err().contains("300 bytes"));
    }

    #[test]
    fn blank_records_are_skipped() {
        assert_eq!(parse("  ").unwrap(), vec![]);
    }

    #[test]
    fn quoting_leaves_strings_alone() {
        assert_eq!(quote_bare_non_finite(r#"{"a": "NaN"}"#), None);
        assert_eq!(
            quote_bare_non_finite(r#"{"a\"NaN": NaN}"#).as_deref(),
            Some(r#"{"a\"NaN": "NaN"}"#)
        );
        assert_eq!(quote_bare_non_finite(r#"{"a": NaNx}"#), None);
    }
}
