//! Runners as admins see them: every live registration with its state,
//! capacity and health (node faults, suspect, cordon), and the uncordon
//! that lets a cordoned runner take work again.

use std::collections::BTreeMap;

use trainmesh_common::audit::{AuditAction, AuditRecord, AuditTable};
use trainmesh_common::proto::runner::v1 as runner_pb;
use trainmesh_common::proto::scheduler::v1 as pb;
use trainmesh_common::time::{to_opt_timestamp, to_timestamp};

use crate::error::{Error, Result};
use crate::repo::{self, Health};
use crate::service::{retrying, Scheduler};

/// Whether a runner takes new work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    Ready,
    Draining,
    Cordoned,
}

/// One runner (by name) as listed.
#[derive(Clone, Debug)]
pub struct RunnerView {
    pub name: String,
    /// The live registration; `None` for a cordoned runner not running now.
    pub registration: Option<repo::RegisteredRunner>,
    pub standing: Standing,
    pub health: Health,
}

impl RunnerView {
    fn of(reg: Option<repo::RegisteredRunner>, health: Option<Health>, name: &str) -> Self {
        let health = health.unwrap_or_else(|| Health {
            name: name.to_owned(),
            ..Health::default()
        });
        // Draining says the runner is leaving, which outlasts a cordon.
        let standing = match (&reg, health.cordoned) {
            (Some(r), _) if r.draining => Standing::Draining,
            (_, true) => Standing::Cordoned,
            _ => Standing::Ready,
        };
        RunnerView {
            name: name.to_owned(),
            registration: reg,
            standing,
            health,
        }
    }

    pub fn capacity(&self) -> Option<&runner_pb::Capacity> {
        self.registration.as_ref().map(|r| &r.capacity)
    }
}

/// The proto form of a listed runner.
pub fn runner_info(v: RunnerView) -> pb::RunnerInfo {
    let state = match v.standing {
        Standing::Ready => pb::RunnerState::Ready,
        Standing::Draining => pb::RunnerState::Draining,
        Standing::Cordoned => pb::RunnerState::Cordoned,
    };
    let h = &v.health;
    let reg = v.registration.as_ref();
    pb::RunnerInfo {
        name: v.name.clone(),
        runner_id: reg.map(|r| r.runner_id.to_string()).unwrap_or_default(),
        state: state as i32,
        backend: reg.map(|r| r.backend.clone()).unwrap_or_default(),
        capacity: v.capacity().cloned(),
        node_faults: i32_of(h.node_faults),
        suspect: h.suspect(),
        cordon_reason: h.cordon_reason.clone(),
        cordon_time: to_opt_timestamp(h.cordoned_at),
        last_fault: h.last_fault.clone(),
        last_fault_time: to_opt_timestamp(h.last_fault_at),
        register_time: reg.map(|r| to_timestamp(r.registered_at)),
        last_heartbeat_time: reg.map(|r| to_timestamp(r.last_heartbeat_at)),
        active_attempts: reg.map_or(0, |r| i32_of(r.active_attempts)),
    }
}

fn i32_of(v: i64) -> i32 {
    i32::try_from(v).unwrap_or(i32::MAX)
}

impl Scheduler {
    /// Runners with a live registration, and cordoned or suspect ones
    /// without, by name (a name's latest registration when it has several).
    pub async fn list_runners(&self) -> Result<Vec<RunnerView>> {
        let (registered, mut health) = tokio::try_join!(
            repo::registered_runners(&self.db, self.now()),
            repo::all_health(&self.db),
        )?;
        let mut by_name: BTreeMap<String, Option<repo::RegisteredRunner>> = BTreeMap::new();
        // Ordered by registration time within a name: the latest wins.
        for r in registered {
            by_name.insert(r.name.clone(), Some(r));
        }
        for (name, h) in &health {
            if h.cordoned || h.suspect() {
                by_name.entry(name.clone()).or_insert(None);
            }
        }
        Ok(by_name
            .into_iter()
            .map(|(name, reg)| {
                let h = health.remove(&name);
                RunnerView::of(reg, h, &name)
            })
            .collect())
    }

    /// Lets runner `name` take work again and forgets its node faults;
    /// waiting jobs that avoided it after a fault there may go back to it.
    /// Audited. Returns the runner afterwards and whether it was cordoned.
    pub async fn uncordon(&self, by: &str, name: &str, note: &str) -> Result<(RunnerView, bool)> {
        let name = name.trim();
        if name.is_empty() {
            return Err(trainmesh_common::error::FieldError::new("name", "is required").into());
        }
        let before = retrying(|| self.uncordon_once(by, name, note.trim())).await?;
        let was_cordoned = before.as_ref().is_some_and(|h| h.cordoned);
        tracing::info!(by = %by, runner = name, was_cordoned,
            node_faults = before.as_ref().map_or(0, |h| h.node_faults), "runner uncordoned");
        self.wake_dispatcher();
        let view = self
            .list_runners()
            .await?
            .into_iter()
            .find(|v| v.name == name)
            .unwrap_or_else(|| RunnerView::of(None, None, name));
        Ok((view, was_cordoned))
    }

    async fn uncordon_once(&self, by: &str, name: &str, note: &str) -> Result<Option<Health>> {
        let now = self.now();
        let mut tx = self.db.begin_write().await?;
        let before = repo::uncordon(&mut tx, name, now).await?;
        if before.is_none() && !repo::runner_known(&mut tx, name).await? {
            return Err(Error::RunnerNameNotFound(name.to_owned()));
        }
        // The admin vouches for the node: jobs that avoid it may use it.
        for (job_id, mut avoided) in repo::waiting_avoiding(&mut tx, name).await? {
            avoided.retain(|n| n != name);
            repo::set_avoid_runners(&mut tx, job_id, &avoided).await?;
        }
        let faults = before.as_ref().map_or(0, |h| h.node_faults);
        AuditRecord::new(by, AuditAction::UncordonRunner, name)
            .detail("note", note)
            .detail(
                "was_cordoned",
                before.as_ref().is_some_and(|h| h.cordoned).to_string(),
            )
            .detail("node_faults", faults.to_string())
            .write(&mut tx, AuditTable::SERVICE, now)
            .await?;
        tx.commit().await?;
        Ok(before)
    }
}
