//! Time as microseconds since the Unix epoch (what the databases store), a
//! [`Clock`] that tests can move, and conversions to protobuf timestamps.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

/// Current wall-clock time in microseconds since the epoch.
pub fn now_micros() -> i64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

pub fn to_timestamp(micros: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: (micros.rem_euclid(1_000_000) * 1000) as i32,
    }
}

/// RFC 3339 in UTC with milliseconds, for messages people read.
pub fn rfc3339_micros(micros: i64) -> String {
    chrono::DateTime::from_timestamp_micros(micros)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_else(|| format!("{micros} µs after the epoch"))
}

/// `None` for 0, which the databases use for "not set".
pub fn to_opt_timestamp(micros: i64) -> Option<prost_types::Timestamp> {
    (micros != 0).then(|| to_timestamp(micros))
}

pub fn from_timestamp(ts: &prost_types::Timestamp) -> i64 {
    ts.seconds
        .saturating_mul(1_000_000)
        .saturating_add(i64::from(ts.nanos) / 1000)
}

/// Converts a protobuf duration to [`std::time::Duration`]; negative values
/// are `None` so callers can reject them by name.
pub fn from_duration(d: &prost_types::Duration) -> Option<std::time::Duration> {
    if d.seconds < 0 || d.nanos < 0 {
        return None;
    }
    Some(std::time::Duration::new(d.seconds as u64, d.nanos as u32))
}

pub fn to_duration(d: std::time::Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// A source of "now". Services take one so that expiry and lease tests can
/// move time instead of waiting for it.
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now_micros(&self) -> i64;
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_micros(&self) -> i64 {
        now_micros()
    }
}

/// Real time plus an offset that tests can advance.
#[derive(Debug, Default, Clone)]
pub struct OffsetClock {
    offset: Arc<AtomicI64>,
}

impl OffsetClock {
    pub fn advance(&self, by: std::time::Duration) {
        self.offset
            .fetch_add(by.as_micros() as i64, Ordering::SeqCst);
    }
}

impl Clock for OffsetClock {
    fn now_micros(&self) -> i64 {
        now_micros() + self.offset.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamp_round_trip_including_negative() {
        for m in [0, 1, 1_700_000_000_123_456, -1, -1_500_001] {
            assert_eq!(from_timestamp(&to_timestamp(m)), m);
        }
    }
}
