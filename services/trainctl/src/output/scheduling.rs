//! Output of the scheduler commands: limits, explanations, approvals and
//! queue statistics.

use std::fmt::Write as _;

use trainmesh_common::proto::scheduler::v1 as sched;

use super::{first_line, human_secs, one_line, pending_reason, short, state, time, Table};

pub fn limit_scope(v: i32) -> String {
    match sched::LimitScope::try_from(v) {
        Ok(sched::LimitScope::Unspecified) => String::new(),
        Ok(s) => short(s.as_str_name(), "LIMIT_SCOPE_"),
        Err(_) => format!("SCOPE({v})"),
    }
}

pub fn approval_state(v: i32) -> String {
    match sched::ApprovalState::try_from(v) {
        Ok(sched::ApprovalState::Unspecified) => String::new(),
        Ok(s) => short(s.as_str_name(), "APPROVAL_STATE_"),
        Err(_) => format!("STATE({v})"),
    }
}

/// `-` for no limit.
fn limit_value(v: Option<i32>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

/// `max_running_jobs=2 max_gpus=- max_queued_jobs=10`.
pub fn limits_line(l: &sched::Limits) -> String {
    format!(
        "max_running_jobs={} max_gpus={} max_queued_jobs={}",
        limit_value(l.max_running_jobs),
        limit_value(l.max_gpus),
        limit_value(l.max_queued_jobs)
    )
}

/// `USER alice`, `GLOBAL`.
pub fn limits_scope_text(l: &sched::Limits) -> String {
    let scope = limit_scope(l.scope);
    if l.subject.is_empty() {
        scope
    } else {
        format!("{scope} {}", l.subject)
    }
}

/// GetLimits: the configured rows, then the effective limits when asked
/// for a user or org.
pub fn limits(resp: &sched::GetLimitsResponse, user: &str, org: &str) -> String {
    let mut out = String::new();
    if resp.limits.is_empty() {
        out.push_str("no limits are configured\n");
    } else {
        let mut t = Table::new(["SCOPE", "SUBJECT", "MAX RUNNING", "MAX GPUS", "MAX QUEUED"]);
        for l in &resp.limits {
            t.row([
                limit_scope(l.scope),
                l.subject.clone(),
                limit_value(l.max_running_jobs),
                limit_value(l.max_gpus),
                limit_value(l.max_queued_jobs),
            ]);
        }
        out.push_str(&t.render());
    }
    if !user.is_empty() || !org.is_empty() {
        let who = match (user.is_empty(), org.is_empty()) {
            (false, false) => format!("user {user} (org {org})"),
            (false, true) => format!("user {user}"),
            _ => format!("org {org}"),
        };
        if resp.effective.is_empty() {
            let _ = writeln!(out, "\nNo limit applies to {who}.");
        } else {
            let _ = writeln!(out, "\nEffective limits for {who}:");
            let mut t = Table::new(["NAME", "VALUE", "FROM"]);
            for e in &resp.effective {
                t.row([
                    e.name.clone(),
                    e.value.to_string(),
                    limit_scope(e.binding_scope),
                ]);
            }
            out.push_str(&t.render());
        }
    }
    out
}

/// ExplainJob: where the job stands, then each blocking cause with what
/// would unblock it.
pub fn explanation(e: &sched::ExplainJobResponse) -> String {
    let mut t = Table::default();
    let mut fields = vec![("Job:", e.job_id.clone()), ("State:", state(e.state))];
    if e.position > 0 {
        fields.push(("Position:", e.position.to_string()));
    }
    if let Some(w) = e.estimated_wait.as_ref() {
        fields.push(("Estimated wait:", human_secs(w.seconds)));
    }
    fields.push(("Summary:", e.summary.clone()));
    if let Some(d) = &e.last_retry {
        fields.push(("Last retry:", super::retry_line(d)));
    }
    if !e.avoided_runners.is_empty() {
        let names: Vec<String> = e.avoided_runners.iter().map(|n| format!("`{n}`")).collect();
        fields.push((
            "Avoiding:",
            format!("{} (node faults there)", names.join(", ")),
        ));
    }
    for (k, v) in fields.into_iter().filter(|(_, v)| !v.is_empty()) {
        t.row([k.to_owned(), v]);
    }
    let mut out = t.render();
    if e.causes.is_empty() {
        out.push_str("Nothing blocks it.\n");
        return out;
    }
    out.push_str("Blocking causes:\n");
    for (i, c) in e.causes.iter().enumerate() {
        let reason = pending_reason(c.reason);
        let head = match (reason.is_empty(), c.detail.is_empty()) {
            (false, false) => format!("{reason}: {}", one_line(&c.detail)),
            (false, true) => reason,
            _ => one_line(&c.detail),
        };
        let _ = writeln!(out, "  {}. {head}", i + 1);
        let scope = limit_scope(c.scope);
        if !scope.is_empty() || c.limit != 0 || c.current != 0 {
            let mut parts = Vec::new();
            if !scope.is_empty() {
                parts.push(format!("scope {scope}"));
            }
            parts.push(format!("limit {}", c.limit));
            parts.push(format!("current {}", c.current));
            let _ = writeln!(out, "     {}", parts.join(", "));
        }
        if !c.unblock.is_empty() {
            let _ = writeln!(out, "     unblock: {}", one_line(&c.unblock));
        }
    }
    out
}

/// One line after ApproveJob/RejectJob.
pub fn decision(verb: &str, job_id: &str, a: Option<&sched::Approval>) -> String {
    let Some(a) = a else {
        return format!("job {job_id} {verb}");
    };
    let mut line = format!("job {} {verb}", a.job_id);
    if !a.decided_by.is_empty() {
        let _ = write!(line, " by {}", a.decided_by);
    }
    if !a.rule.is_empty() {
        let _ = write!(line, " (rule {})", a.rule);
    }
    if !a.note.is_empty() {
        let _ = write!(line, ": {}", one_line(&a.note));
    }
    line
}

pub fn approvals_table(approvals: &[sched::Approval]) -> String {
    let mut t = Table::new([
        "JOB",
        "OWNER",
        "STATE",
        "RULE",
        "REQUESTED",
        "EXPIRES",
        "DECIDED BY",
        "NOTE",
    ]);
    for a in approvals {
        t.row([
            a.job_id.clone(),
            a.owner.clone(),
            approval_state(a.state),
            a.rule.clone(),
            time(a.create_time.as_ref()),
            time(a.expire_time.as_ref()),
            a.decided_by.clone(),
            first_line(&a.note).to_owned(),
        ]);
    }
    t.render()
}

pub fn queue_stats(s: &sched::GetQueueStatsResponse) -> String {
    let mut t = Table::default();
    let avg = s
        .average_wait
        .as_ref()
        .map(|d| {
            format!(
                "{} (jobs dispatched in the last hour)",
                human_secs(d.seconds)
            )
        })
        .unwrap_or_else(|| "unknown (nothing dispatched in the last hour)".into());
    for (k, v) in [
        ("Held:", if s.held { "yes" } else { "no" }.to_owned()),
        ("Queued:", s.queued.to_string()),
        ("Awaiting approval:", s.awaiting_approval.to_string()),
        ("Running:", s.running.to_string()),
        ("Average wait:", avg),
        ("Runners:", s.runners.to_string()),
        (
            "GPUs in use:",
            format!("{} of {}", s.gpus_in_use, s.gpus_total),
        ),
    ] {
        t.row([k.to_owned(), v]);
    }
    let mut out = t.render();
    if !s.by_user.is_empty() {
        out.push_str("By user:\n");
        let mut t = Table::new(["  OWNER", "QUEUED", "RUNNING", "GPUS IN USE"]);
        for u in &s.by_user {
            t.row([
                format!("  {}", u.owner),
                u.queued.to_string(),
                u.running.to_string(),
                u.gpus_in_use.to_string(),
            ]);
        }
        out.push_str(&t.render());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use trainmesh_common::proto::job::v1 as pb;

    fn ts(seconds: i64) -> Option<prost_types::Timestamp> {
        Some(prost_types::Timestamp { seconds, nanos: 0 })
    }

    #[test]
    fn explanation_lists_every_cause_with_its_unblock() {
        let e = sched::ExplainJobResponse {
            job_id: "j1".into(),
            state: pb::JobState::Queued as i32,
            position: 3,
            estimated_wait: Some(prost_types::Duration {
                seconds: 600,
                nanos: 0,
            }),
            summary: "waiting: 2 causes".into(),
            causes: vec![
                sched::BlockingCause {
                    reason: sched::PendingReason::UserRunningLimit as i32,
                    detail: "user limit max_running_jobs=2 from USER_DEFAULT; alice has 2 running"
                        .into(),
                    unblock: "job `j0` finishing frees a slot".into(),
                    scope: sched::LimitScope::UserDefault as i32,
                    limit: 2,
                    current: 2,
                },
                sched::BlockingCause {
                    reason: sched::PendingReason::Held as i32,
                    detail: "the queue is held by admin".into(),
                    unblock: "release with `trainctl queue release`".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let out = explanation(&e);
        assert!(out.starts_with("Job:             j1\nState:           QUEUED\nPosition:        3\nEstimated wait:  10m\n"), "{out}");
        assert!(out.contains("  1. USER_RUNNING_LIMIT: user limit max_running_jobs=2 from USER_DEFAULT; alice has 2 running\n     scope USER_DEFAULT, limit 2, current 2\n     unblock: job `j0` finishing frees a slot\n"), "{out}");
        assert!(out.contains("  2. HELD: the queue is held by admin\n     unblock: release with `trainctl queue release`\n"), "{out}");
        let running = sched::ExplainJobResponse {
            job_id: "j2".into(),
            state: pb::JobState::Running as i32,
            summary: "job is running".into(),
            ..Default::default()
        };
        let out = explanation(&running);
        assert!(
            out.ends_with("Summary:  job is running\nNothing blocks it.\n"),
            "{out}"
        );
        let retried = sched::ExplainJobResponse {
            last_retry: Some(sched::RetryDecision {
                attempt: 1,
                action: sched::RetryAction::OtherRunner as i32,
                reason: "retrying on another runner after a node fault".into(),
                runner_name: "runner-a".into(),
                category: "gpu-unavailable".into(),
                ..Default::default()
            }),
            avoided_runners: vec!["runner-a".into()],
            ..running
        };
        let out = explanation(&retried);
        assert!(
            out.contains(
                "Last retry:  attempt 1 on `runner-a` (gpu-unavailable): OTHER_RUNNER: retrying \
                 on another runner after a node fault\n"
            ),
            "{out}"
        );
        assert!(
            out.contains("Avoiding:    `runner-a` (node faults there)\n"),
            "{out}"
        );
    }

    #[test]
    fn limits_show_rows_dashes_for_none_and_the_binding_scope() {
        let resp = sched::GetLimitsResponse {
            limits: vec![
                sched::Limits {
                    scope: sched::LimitScope::UserDefault as i32,
                    max_running_jobs: Some(2),
                    ..Default::default()
                },
                sched::Limits {
                    scope: sched::LimitScope::Org as i32,
                    subject: "ml".into(),
                    max_gpus: Some(16),
                    max_queued_jobs: Some(100),
                    ..Default::default()
                },
            ],
            effective: vec![sched::EffectiveLimit {
                name: "max_running_jobs".into(),
                value: 2,
                binding_scope: sched::LimitScope::UserDefault as i32,
            }],
        };
        let out = limits(&resp, "alice", "ml");
        assert_eq!(
            out,
            "SCOPE         SUBJECT  MAX RUNNING  MAX GPUS  MAX QUEUED\n\
             USER_DEFAULT           2            -         -\n\
             ORG           ml       -            16        100\n\
             \n\
             Effective limits for user alice (org ml):\n\
             NAME              VALUE  FROM\n\
             max_running_jobs  2      USER_DEFAULT\n"
        );
        let none = limits(&Default::default(), "", "");
        assert_eq!(none, "no limits are configured\n");
        assert_eq!(
            limits_line(&resp.limits[1]),
            "max_running_jobs=- max_gpus=16 max_queued_jobs=100"
        );
        assert_eq!(limits_scope_text(&resp.limits[1]), "ORG ml");
    }

    #[test]
    fn approvals_and_decisions_read_well() {
        let a = sched::Approval {
            job_id: "j1".into(),
            owner: "alice".into(),
            state: sched::ApprovalState::Approved as i32,
            rule: "big-gpu-jobs".into(),
            decided_by: "carol".into(),
            note: "ok for\nthis week".into(),
            create_time: ts(1_700_000_000),
            expire_time: ts(1_700_086_400),
            ..Default::default()
        };
        assert_eq!(
            decision("approved", "j1", Some(&a)),
            "job j1 approved by carol (rule big-gpu-jobs): ok for this week"
        );
        assert_eq!(decision("rejected", "j9", None), "job j9 rejected");
        let out = approvals_table(&[a]);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].starts_with("JOB  OWNER  STATE     RULE"), "{out}");
        assert!(lines[1].contains("APPROVED"), "{out}");
        assert!(lines[1].contains("2023-11-15 22:13:20Z"), "{out}");
        assert!(lines[1].ends_with("carol       ok for"), "{out}");
    }

    #[test]
    fn queue_stats_show_totals_and_users() {
        let s = sched::GetQueueStatsResponse {
            queued: 12,
            running: 4,
            awaiting_approval: 1,
            by_user: vec![sched::UserQueueStats {
                owner: "alice".into(),
                queued: 10,
                running: 2,
                gpus_in_use: 4,
            }],
            average_wait: Some(prost_types::Duration {
                seconds: 90,
                nanos: 0,
            }),
            runners: 2,
            gpus_total: 8,
            gpus_in_use: 4,
            held: true,
        };
        let out = queue_stats(&s);
        assert!(
            out.starts_with("Held:               yes\nQueued:             12\n"),
            "{out}"
        );
        assert!(
            out.contains("Average wait:       90s (jobs dispatched in the last hour)"),
            "{out}"
        );
        assert!(out.contains("GPUs in use:        4 of 8"), "{out}");
        assert!(out.contains("  alice  10      2        4"), "{out}");
        let empty = queue_stats(&Default::default());
        assert!(empty.contains("unknown"), "{empty}");
        assert!(!empty.contains("By user"), "{empty}");
    }
}
