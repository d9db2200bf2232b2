//! Which destinations of an outbox are down, and when to probe them.
//!
//! While a destination (another service) cannot be reached, every message
//! for it would fail the same way: retrying each on its own schedule only
//! spreads the backlog over the longest backoff. So the relay backs off the
//! destination as a whole: while it is down, one message at a time probes
//! it, at a short and bounded interval; the first success opens it again,
//! and the backlog follows at once, in order.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

/// First pause after a destination turns out to be down.
const FIRST_PROBE_GAP: Duration = Duration::from_millis(50);
/// Longest pause between probes: how late, at worst, a destination that
/// came back is noticed.
pub const MAX_PROBE_GAP: Duration = Duration::from_millis(200);

#[derive(Debug)]
struct Down {
    since: Instant,
    next_probe: Instant,
    gap: Duration,
}

/// What the relay may do with a destination in this round.
#[derive(Debug, PartialEq, Eq)]
pub enum Gate {
    Open,
    /// Down, and due: send one message as a probe.
    Probe,
    /// Down, and not due yet.
    Closed,
}

#[derive(Debug, Default)]
pub struct Destinations {
    down: HashMap<String, Down>,
}

impl Destinations {
    pub fn gate(&self, dest: &str, now: Instant) -> Gate {
        match self.down.get(dest) {
            None => Gate::Open,
            Some(d) if d.next_probe <= now => Gate::Probe,
            Some(_) => Gate::Closed,
        }
    }

    /// A delivery to `dest` got through.
    pub fn reached(&mut self, dest: &str) {
        if let Some(d) = self.down.remove(dest) {
            tracing::info!(
                destination = dest,
                down_ms = d.since.elapsed().as_millis() as u64,
                "outbox destination reachable again; delivering its backlog"
            );
        }
    }

    /// A delivery to `dest` found it unreachable.
    pub fn unreachable(&mut self, dest: &str, why: &str, now: Instant) {
        match self.down.get_mut(dest) {
            Some(d) => {
                d.gap = (d.gap * 2).min(MAX_PROBE_GAP);
                d.next_probe = now + d.gap;
            }
            None => {
                tracing::warn!(
                    destination = dest,
                    error = why,
                    "outbox destination unreachable; probing it until it answers"
                );
                self.down.insert(
                    dest.to_owned(),
                    Down {
                        since: now,
                        next_probe: now + FIRST_PROBE_GAP,
                        gap: FIRST_PROBE_GAP,
                    },
                );
            }
        }
    }

    /// When the next probe is due, if any destination is down.
    pub fn next_probe(&self) -> Option<Instant> {
        self.down.values().map(|d| d.next_probe).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_down_destination_is_probed_ever_more_rarely_up_to_the_cap() {
        let mut d = Destinations::default();
        let t0 = Instant::now();
        assert_eq!(d.gate("scheduler", t0), Gate::Open);
        d.unreachable("scheduler", "connection refused", t0);
        assert_eq!(d.gate("scheduler", t0), Gate::Closed);
        assert_eq!(d.gate("diagnosis", t0), Gate::Open);
        assert_eq!(d.gate("scheduler", t0 + FIRST_PROBE_GAP), Gate::Probe);
        let mut now = t0;
        for _ in 0..10 {
            now = d.next_probe().unwrap();
            d.unreachable("scheduler", "connection refused", now);
        }
        assert_eq!(d.next_probe().unwrap() - now, MAX_PROBE_GAP);
        d.reached("scheduler");
        assert_eq!(d.gate("scheduler", now), Gate::Open);
        assert_eq!(d.next_probe(), None);
    }
}
