//! What the backend saw of the job, its pods and their Warning events,
//! as small records. They go into the attempt's log as `[trainmesh] k8s:`
//! lines, where the diagnosis' control layer finds pod states, waiting
//! reasons, terminations and events next to the job's own output.

use k8s_openapi::api::core::v1::Event;

use super::status::{ContainerNow, JobStatus, PodView};

/// One observed fact.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Observation {
    /// "job", "pod", "container" or "event".
    pub kind: &'static str,
    /// Phase, waiting or termination reason, or the event's reason.
    pub reason: String,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
}

impl Observation {
    fn new(kind: &'static str, reason: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            kind,
            reason: reason.into(),
            message: message.into(),
            pod: None,
            container: None,
            exit_code: None,
            time: None,
        }
    }

    /// What makes two observations the same fact: everything but the time
    /// (an event seen again with a newer timestamp is not news).
    pub fn key(&self) -> String {
        format!(
            "{}\u{1f}{}\u{1f}{}\u{1f}{:?}\u{1f}{:?}\u{1f}{:?}",
            self.kind, self.reason, self.message, self.pod, self.container, self.exit_code
        )
    }

    /// The log line: readable, with the words the diagnosis rules match
    /// (ImagePullBackOff, OOMKilled, Unschedulable, exit code N).
    pub fn line(&self) -> String {
        let mut s = format!("[trainmesh] k8s: {} {}", self.kind, self.reason);
        if let Some(p) = &self.pod {
            s.push_str(&format!(" pod={p}"));
        }
        if let Some(c) = &self.container {
            s.push_str(&format!(" container={c}"));
        }
        if let Some(code) = self.exit_code {
            s.push_str(&format!(" exit_code={code}"));
        }
        if let Some(t) = &self.time {
            s.push_str(&format!(" time={t}"));
        }
        if !self.message.is_empty() {
            s.push_str(": ");
            // One line per observation: a multi-line message (a
            // termination message with a traceback) stays on it.
            s.push_str(&self.message.replace(['\n', '\r'], " | "));
        }
        s
    }
}

/// The job's phase as an observation.
pub fn of_job(kind: &str, name: &str, status: &JobStatus) -> Observation {
    let mut message = format!("{kind} {name}");
    if !status.reason.is_empty() {
        message.push_str(&format!(" ({})", status.reason));
    }
    if !status.message.is_empty() {
        message.push_str(&format!(": {}", status.message));
    }
    Observation {
        time: status.since.clone(),
        ..Observation::new("job", status.phase.as_str(), message)
    }
}

/// A pod's phase, scheduling trouble and container states.
pub fn of_pod(pod: &PodView) -> Vec<Observation> {
    let mut out = Vec::new();
    let mut phase_msg = pod.role.to_string();
    if !pod.reason.is_empty() || !pod.message.is_empty() {
        let detail = format!(": {} {}", pod.reason, pod.message);
        phase_msg.push_str(detail.trim_end());
    }
    out.push(Observation {
        pod: Some(pod.name.clone()),
        ..Observation::new("pod", pod.phase.clone(), phase_msg)
    });
    // Said once, apart from the phase, so the diagnosis can cite why the
    // attempt ended even when the container's exit looks like a crash.
    if let Some(d) = &pod.disrupted {
        let msg = format!(
            "{} {} by the platform{}",
            pod.role,
            d.kind.past(),
            d.detail()
        );
        out.push(Observation {
            pod: Some(pod.name.clone()),
            time: d.since.clone(),
            ..Observation::new("pod", d.kind.as_str(), msg)
        });
    }
    if let Some(msg) = &pod.unschedulable {
        out.push(Observation {
            pod: Some(pod.name.clone()),
            ..Observation::new("pod", "Unschedulable", msg.clone())
        });
    }
    for c in &pod.containers {
        let base = |reason: &str, message: &str| Observation {
            pod: Some(pod.name.clone()),
            container: Some(c.name.clone()),
            ..Observation::new("container", reason, message)
        };
        match &c.now {
            ContainerNow::Waiting { reason, message } if !reason.is_empty() => {
                out.push(base(reason, message));
            }
            ContainerNow::Terminated(t) => out.push(Observation {
                exit_code: Some(t.exit_code),
                time: t.finished_at.clone(),
                ..base(&t.reason, &t.message)
            }),
            _ => {}
        }
        if let Some(t) = &c.last {
            let msg = format!("previous run (restarts: {}) {}", c.restart_count, t.message);
            out.push(Observation {
                exit_code: Some(t.exit_code),
                time: t.finished_at.clone(),
                ..base(&format!("Restarted after {}", t.reason), msg.trim_end())
            });
        }
    }
    out
}

/// Whether `event` is about the attempt's object `name` or one of its
/// pods (which are named `<name>-…`).
pub fn concerns(event: &Event, name: &str) -> bool {
    let obj = event.involved_object.name.as_deref().unwrap_or_default();
    obj == name
        || obj
            .strip_prefix(name)
            .is_some_and(|rest| rest.starts_with('-'))
}

/// The time an event last happened, whichever field its source set.
pub fn event_instant(event: &Event) -> Option<k8s_openapi::jiff::Timestamp> {
    // Events recorded through the events.k8s.io API (the scheduler's)
    // carry eventTime and a series instead of the legacy timestamps.
    event
        .series
        .as_ref()
        .and_then(|s| s.last_observed_time.as_ref())
        .map(|t| t.0)
        .or_else(|| event.last_timestamp.as_ref().map(|t| t.0))
        .or_else(|| event.event_time.as_ref().map(|t| t.0))
        .or_else(|| event.first_timestamp.as_ref().map(|t| t.0))
}

fn event_time(event: &Event) -> Option<String> {
    event_instant(event).map(|t| t.to_string())
}

/// A Warning event as an observation.
pub fn of_event(event: &Event) -> Observation {
    let obj = &event.involved_object;
    let is_pod = obj.kind.as_deref() == Some("Pod");
    let mut message = event.message.clone().unwrap_or_default();
    if !is_pod {
        message = format!(
            "{} {}: {message}",
            obj.kind.as_deref().unwrap_or("object"),
            obj.name.as_deref().unwrap_or_default()
        );
    }
    Observation {
        pod: is_pod.then(|| obj.name.clone().unwrap_or_default()),
        time: event_time(event),
        ..Observation::new("event", event.reason.clone().unwrap_or_default(), message)
    }
}

/// The Warning events among `events` about the object `name` and its pods,
/// oldest first.
pub fn warnings<'a>(events: &'a [Event], name: &str) -> Vec<&'a Event> {
    let mut out: Vec<&Event> = events
        .iter()
        .filter(|e| e.type_.as_deref() == Some("Warning") && concerns(e, name))
        .collect();
    out.sort_by_key(|e| event_instant(e));
    out
}
