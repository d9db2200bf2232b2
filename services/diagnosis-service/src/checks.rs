//! The facts the static checks of a spec compare it with (what the runners
//! offer, how long earlier runs took), and the evidence those checks cite.

use crate::domain::{Evidence, JobFacts};
use crate::text;

/// What the static checks of the spec compare it with.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CheckFacts {
    /// `spec.deadline`, when set.
    pub deadline: Option<std::time::Duration>,
    /// How long earlier successful runs of a job of the same owner and
    /// name took, newest first.
    pub history: Vec<std::time::Duration>,
    /// `spec.resources` besides the GPU count and shared memory.
    pub gpu_type: String,
    pub cpu: f64,
    pub memory_mib: i64,
    /// What each runner offers, when the scheduler said.
    pub fleet: Option<Vec<Offer>>,
}

/// What one runner offers a replica.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Offer {
    pub runner: String,
    /// GPU models, one per GPU.
    pub gpus: Vec<String>,
    pub cpu: f64,
    pub memory_mib: i64,
}

impl Offer {
    /// Whether this runner could take a replica asking for `gpus` GPUs of
    /// `gpu_type` (a model substring, any when empty), `cpu` cores and
    /// `memory_mib` (0: unstated, on either side).
    pub fn fits(&self, gpus: i32, gpu_type: &str, cpu: f64, memory_mib: i64) -> bool {
        let wanted = gpu_type.to_ascii_lowercase();
        let matching = self
            .gpus
            .iter()
            .filter(|m| m.to_ascii_lowercase().contains(&wanted))
            .count();
        let gpus_ok = usize::try_from(gpus).map_or(true, |g| g <= matching);
        let cpu_ok = cpu <= 0.0 || self.cpu <= 0.0 || cpu <= self.cpu;
        let mem_ok = memory_mib <= 0 || self.memory_mib <= 0 || memory_mib <= self.memory_mib;
        gpus_ok && cpu_ok && mem_ok
    }

    /// "node-1: 4 GPUs (NVIDIA A100), 64 cores, 512 GiB".
    pub fn describe(&self) -> String {
        let mut models: Vec<&str> = self.gpus.iter().map(String::as_str).collect();
        models.dedup();
        let gpus = match models.as_slice() {
            [] => "no GPUs".to_owned(),
            _ => format!("{} GPUs ({})", self.gpus.len(), models.join(", ")),
        };
        format!(
            "{}: {gpus}, {} cores, {} MiB",
            self.runner, self.cpu, self.memory_mib
        )
    }
}

/// Runners quoted when none fits.
const MAX_OFFERS_QUOTED: usize = 5;

/// The request against every runner's offer.
pub fn beyond_fleet(job: &JobFacts) -> Option<Evidence> {
    let c = &job.checks;
    let fleet = c.fleet.as_ref().filter(|f| !f.is_empty())?;
    if fleet
        .iter()
        .any(|o| o.fits(job.gpus, &c.gpu_type, c.cpu, c.memory_mib))
    {
        return None;
    }
    let mut asked = format!("{} GPUs", job.gpus.max(0));
    if !c.gpu_type.is_empty() {
        asked.push_str(&format!(" of type `{}`", c.gpu_type));
    }
    if c.cpu > 0.0 {
        asked.push_str(&format!(", {} cores", c.cpu));
    }
    if c.memory_mib > 0 {
        asked.push_str(&format!(", {} MiB", c.memory_mib));
    }
    let offers: Vec<String> = fleet
        .iter()
        .take(MAX_OFFERS_QUOTED)
        .map(|o| o.describe())
        .collect();
    let more = fleet.len().saturating_sub(MAX_OFFERS_QUOTED);
    let more = if more > 0 {
        format!("; and {more} more")
    } else {
        String::new()
    };
    Some(Evidence::spec(format!(
        "each replica asks for {asked}; no runner offers that: {}{more}",
        offers.join("; ")
    )))
}

/// The deadline against the runs it would have cut short.
pub fn deadline_below_history(c: &CheckFacts) -> Option<Evidence> {
    let deadline = c.deadline?;
    let longer: Vec<String> = c
        .history
        .iter()
        .filter(|d| **d > deadline)
        .map(|d| text::duration(*d))
        .collect();
    if longer.is_empty() {
        return None;
    }
    Some(Evidence::spec(format!(
        "spec.deadline = {}; {} of the last {} successful runs of this job took longer ({})",
        text::duration(deadline),
        longer.len(),
        c.history.len(),
        longer.join(", ")
    )))
}
