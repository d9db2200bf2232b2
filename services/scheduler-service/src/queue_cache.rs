//! The dispatching replica's copy of the waiting queue.
//!
//! Reading 10,000 waiting entries every round cost more than planning over
//! them; instead the leader loads the queue once and then, each round,
//! reads only the entries changed since (migration 0003 stamps every
//! change, whichever replica or code path made it). Placement stays safe
//! whatever this copy holds: every dispatch is a compare-and-set on the
//! entry's state in the fenced transaction, and usage (what limits count)
//! is read fresh each round. A full reload runs on a period anyway, and
//! whenever this replica (re)gains the leader lease.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;
use trainmesh_common::db::{self, Db};

use crate::domain::{EntryState, JobId};
use crate::error::Result;
use crate::repo::{self, EntryRow};

/// The states the dispatcher plans over.
pub(crate) const WAITING: [EntryState; 2] = [EntryState::Queued, EntryState::AwaitingApproval];

/// A full reload at least this often, as a safety net.
const FULL_RELOAD_EVERY: Duration = Duration::from_secs(60);

#[derive(Debug)]
pub(crate) struct QueueCache {
    waiting: HashMap<JobId, EntryRow>,
    /// Where the last read stood (`repo::queue_cursor`).
    cursor: i64,
    /// When the next full load is due; `None`: at the next refresh.
    next_full: Option<Instant>,
}

impl QueueCache {
    pub fn new() -> Self {
        QueueCache {
            waiting: HashMap::new(),
            cursor: 0,
            next_full: None,
        }
    }

    /// Forgets everything: the next refresh loads the whole queue.
    pub fn invalidate(&mut self) {
        self.next_full = None;
        self.waiting.clear();
    }

    /// The waiting entries (QUEUED or AWAITING_APPROVAL, no cancel asked).
    pub fn waiting(&self) -> &HashMap<JobId, EntryRow> {
        &self.waiting
    }

    /// Brings the copy up to date with the database.
    pub async fn refresh(&mut self, db: &Db) -> Result<()> {
        let full = self.next_full.is_none_or(|t| Instant::now() >= t);
        // One snapshot for the cursor and the rows: nothing committed
        // between them can fall through.
        let mut tx = db::snapshot(db).await?;
        let cursor = repo::queue_cursor(&mut tx, db.backend).await?;
        if full {
            let rows = repo::entries_in_on(&mut tx, &WAITING).await?;
            tx.commit().await?;
            self.waiting.clear();
            self.apply(rows);
            self.next_full = Some(Instant::now() + FULL_RELOAD_EVERY);
        } else {
            let rows = repo::entries_changed_since(&mut tx, db.backend, self.cursor).await?;
            tx.commit().await?;
            self.apply(rows);
        }
        self.cursor = cursor;
        Ok(())
    }

    /// Rows carry their current state: keep the waiting ones, drop the rest.
    fn apply(&mut self, rows: Vec<EntryRow>) {
        for row in rows {
            if WAITING.contains(&row.state) && !row.cancel_requested {
                self.waiting.insert(row.job_id, row);
            } else {
                self.waiting.remove(&row.job_id);
            }
        }
    }
}

impl Default for QueueCache {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
#[path = "queue_cache_tests.rs"]
mod tests;
