//! `-o json`: explicit converters from the proto messages trainctl prints to
//! `serde_json::Value` (prost types do not implement serde).
//!
//! Conventions, the same for every message: field names as in the .proto
//! (snake_case); enums as their full proto names (`"JOB_STATE_RUNNING"`),
//! or the number when the value is unknown to this build; timestamps as
//! RFC 3339 in UTC; durations as proto JSON does (`"30s"`, `"1.500s"`);
//! non-finite floats as `"NaN"`, `"Infinity"`, `"-Infinity"`; unset
//! messages and timestamps as `null`.

use std::collections::HashMap;

use serde_json::{json, Map, Value};
use trainmesh_common::proto::audit::v1 as audit;
use trainmesh_common::proto::auth::v1 as auth;
use trainmesh_common::proto::diagnosis::v1 as diag;
use trainmesh_common::proto::job::v1 as pb;
use trainmesh_common::proto::metrics::v1 as metrics;
use trainmesh_common::proto::scheduler::v1 as sched;

pub fn timestamp(ts: Option<&prost_types::Timestamp>) -> Value {
    match ts.and_then(rfc3339) {
        Some(s) => Value::String(s),
        None => Value::Null,
    }
}

pub fn rfc3339(ts: &prost_types::Timestamp) -> Option<String> {
    let nanos = u32::try_from(ts.nanos).ok()?;
    let dt = chrono::DateTime::<chrono::Utc>::from_timestamp(ts.seconds, nanos)?;
    Some(dt.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
}

pub fn duration(d: Option<&prost_types::Duration>) -> Value {
    match d {
        None => Value::Null,
        Some(d) if d.nanos == 0 => Value::String(format!("{}s", d.seconds)),
        Some(d) => {
            let frac = format!("{:09}", d.nanos.unsigned_abs());
            let frac = frac.trim_end_matches('0');
            let sign = if d.seconds == 0 && d.nanos < 0 {
                "-"
            } else {
                ""
            };
            Value::String(format!("{sign}{}.{frac}s", d.seconds))
        }
    }
}

pub fn float(v: f64) -> Value {
    if v.is_nan() {
        json!("NaN")
    } else if v == f64::INFINITY {
        json!("Infinity")
    } else if v == f64::NEG_INFINITY {
        json!("-Infinity")
    } else {
        json!(v)
    }
}

fn enum_value(name: Option<&'static str>, raw: i32) -> Value {
    match name {
        Some(n) => Value::String(n.to_owned()),
        None => Value::from(raw),
    }
}

pub fn job_state(v: i32) -> Value {
    enum_value(pb::JobState::try_from(v).ok().map(|e| e.as_str_name()), v)
}

fn failure_cause(v: i32) -> Value {
    enum_value(
        pb::FailureCause::try_from(v).ok().map(|e| e.as_str_name()),
        v,
    )
}

fn attempt_state(v: i32) -> Value {
    enum_value(
        pb::AttemptState::try_from(v).ok().map(|e| e.as_str_name()),
        v,
    )
}

fn algorithm(v: i32) -> Value {
    enum_value(
        pb::TrainingAlgorithm::try_from(v)
            .ok()
            .map(|e| e.as_str_name()),
        v,
    )
}

fn pending_reason(v: i32) -> Value {
    enum_value(
        sched::PendingReason::try_from(v)
            .ok()
            .map(|e| e.as_str_name()),
        v,
    )
}

fn layer(v: i32) -> Value {
    enum_value(diag::Layer::try_from(v).ok().map(|e| e.as_str_name()), v)
}

fn string_map(m: &HashMap<String, String>) -> Value {
    // serde_json's Map is ordered by key, so output is stable.
    Value::Object(
        m.iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect::<Map<_, _>>(),
    )
}

pub fn job_spec(s: &pb::JobSpec) -> Value {
    json!({
        "name": s.name,
        "labels": string_map(&s.labels),
        "image": s.image,
        "command": s.command,
        "env": string_map(&s.env),
        "working_dir": s.working_dir,
        "resources": s.resources.as_ref().map(|r| json!({
            "gpus": r.gpus,
            "gpu_type": r.gpu_type,
            "cpu": float(r.cpu),
            "memory_mib": r.memory_mib,
            "shm_mib": r.shm_mib,
        })),
        "replicas": s.replicas.as_ref().map(|r| json!({
            "masters": r.masters,
            "workers": r.workers,
        })),
        "training": s.training.as_ref().map(|t| json!({
            "algorithm": algorithm(t.algorithm),
            "model": t.model,
            "dataset_path": t.dataset_path,
            "output_path": t.output_path,
            "hyperparameters": string_map(&t.hyperparameters),
        })),
        "priority": s.priority,
        "retry_policy": s.retry_policy.as_ref().map(|r| json!({
            "max_attempts": r.max_attempts,
            "retry_user_errors": r.retry_user_errors,
            "initial_backoff": duration(r.initial_backoff.as_ref()),
            "max_backoff": duration(r.max_backoff.as_ref()),
        })),
        "deadline": duration(s.deadline.as_ref()),
        "termination_grace": duration(s.termination_grace.as_ref()),
    })
}

pub fn job_error(e: &pb::JobError) -> Value {
    json!({
        "type": e.r#type,
        "message": e.message,
        "traceback": e.traceback,
        "exit_code": e.exit_code,
        "signal": e.signal,
        "category": e.category,
        "retryable": e.retryable,
        "hint": e.hint,
    })
}

pub fn attempt(a: &pb::Attempt) -> Value {
    json!({
        "number": a.number,
        "runner_id": a.runner_id,
        "state": attempt_state(a.state),
        "create_time": timestamp(a.create_time.as_ref()),
        "start_time": timestamp(a.start_time.as_ref()),
        "end_time": timestamp(a.end_time.as_ref()),
        "exit_code": a.exit_code,
        "error": a.error.as_ref().map(job_error),
    })
}

pub fn job(j: &pb::Job) -> Value {
    json!({
        "id": j.id,
        "owner": j.owner,
        "org": j.org,
        "spec": j.spec.as_ref().map(job_spec),
        "state": job_state(j.state),
        "failure_cause": failure_cause(j.failure_cause),
        "error": j.error.as_ref().map(job_error),
        "error_message": j.error_message,
        "state_reason": j.state_reason,
        "attempts": j.attempts.iter().map(attempt).collect::<Vec<_>>(),
        "create_time": timestamp(j.create_time.as_ref()),
        "update_time": timestamp(j.update_time.as_ref()),
        "start_time": timestamp(j.start_time.as_ref()),
        "end_time": timestamp(j.end_time.as_ref()),
        "correlation_id": j.correlation_id,
        "cancel_requested": j.cancel_requested,
        "pipeline_id": j.pipeline_id,
        "pipeline_stage": j.pipeline_stage,
        "diagnosis": j.diagnosis.as_ref().map(|d| json!({
            "diagnosis_id": d.diagnosis_id,
            "healthy": d.healthy,
            "error": d.error,
            "solution": d.solution,
        })),
    })
}

pub fn job_event(e: &pb::JobEvent) -> Value {
    json!({
        "job_id": e.job_id,
        "sequence": e.sequence,
        "cursor": e.cursor,
        "type": e.r#type,
        "state": job_state(e.state),
        "previous_state": job_state(e.previous_state),
        "message": e.message,
        "time": timestamp(e.time.as_ref()),
        "attempt": e.attempt,
    })
}

pub fn log_line(l: &pb::LogLine) -> Value {
    json!({ "attempt": l.attempt, "number": l.number, "text": l.text })
}

pub fn metric_point(p: &metrics::MetricPoint) -> Value {
    json!({
        "key": p.key,
        "step": p.step,
        "value": float(p.value),
        "time": timestamp(p.time.as_ref()),
        "non_finite": p.non_finite,
    })
}

pub fn queue_entry(q: &sched::QueueEntry) -> Value {
    json!({
        "job_id": q.job_id,
        "owner": q.owner,
        "org": q.org,
        "priority": q.priority,
        "effective_priority": float(q.effective_priority),
        "position": q.position,
        "estimated_wait": duration(q.estimated_wait.as_ref()),
        "reason": pending_reason(q.reason),
        "reason_detail": q.reason_detail,
        "gpus": q.gpus,
        "submit_time": timestamp(q.submit_time.as_ref()),
        "state": job_state(q.state),
    })
}

fn limit_scope(v: i32) -> Value {
    enum_value(
        sched::LimitScope::try_from(v).ok().map(|e| e.as_str_name()),
        v,
    )
}

fn approval_state(v: i32) -> Value {
    enum_value(
        sched::ApprovalState::try_from(v)
            .ok()
            .map(|e| e.as_str_name()),
        v,
    )
}

/// An unset limit is `null` (no limit at this scope).
pub fn limits(l: &sched::Limits) -> Value {
    json!({
        "scope": limit_scope(l.scope),
        "subject": l.subject,
        "max_running_jobs": l.max_running_jobs,
        "max_gpus": l.max_gpus,
        "max_queued_jobs": l.max_queued_jobs,
    })
}

pub fn get_limits(r: &sched::GetLimitsResponse) -> Value {
    json!({
        "limits": r.limits.iter().map(limits).collect::<Vec<_>>(),
        "effective": r.effective.iter().map(|e| json!({
            "name": e.name,
            "value": e.value,
            "binding_scope": limit_scope(e.binding_scope),
        })).collect::<Vec<_>>(),
    })
}

pub fn explanation(e: &sched::ExplainJobResponse) -> Value {
    json!({
        "job_id": e.job_id,
        "state": job_state(e.state),
        "causes": e.causes.iter().map(|c| json!({
            "reason": pending_reason(c.reason),
            "detail": c.detail,
            "unblock": c.unblock,
            "scope": limit_scope(c.scope),
            "limit": c.limit,
            "current": c.current,
        })).collect::<Vec<_>>(),
        "position": e.position,
        "estimated_wait": duration(e.estimated_wait.as_ref()),
        "summary": e.summary,
        "last_retry": e.last_retry.as_ref().map(crate::output::retry_json),
        "avoided_runners": e.avoided_runners,
    })
}

pub fn token(t: &auth::Token) -> Value {
    json!({
        "id": t.id,
        "user": t.user,
        "org": t.org,
        "roles": t.roles,
        "description": t.description,
        "create_time": timestamp(t.create_time.as_ref()),
        "expire_time": timestamp(t.expire_time.as_ref()),
        "last_use_time": timestamp(t.last_use_time.as_ref()),
        "revoked": t.revoked,
        "revoke_time": timestamp(t.revoke_time.as_ref()),
        "created_by": t.created_by,
        "revoked_by": t.revoked_by,
    })
}

pub fn audit_event(e: &audit::AuditEvent) -> Value {
    let details: std::collections::BTreeMap<&String, &String> = e.details.iter().collect();
    json!({
        "id": e.id,
        "time": timestamp(e.time.as_ref()),
        "service": e.service,
        "actor": e.actor,
        "action": e.action,
        "target": e.target,
        "details": details,
        "correlation_id": e.correlation_id,
    })
}

pub fn approval(a: &sched::Approval) -> Value {
    json!({
        "job_id": a.job_id,
        "owner": a.owner,
        "state": approval_state(a.state),
        "rule": a.rule,
        "decided_by": a.decided_by,
        "note": a.note,
        "create_time": timestamp(a.create_time.as_ref()),
        "expire_time": timestamp(a.expire_time.as_ref()),
        "decide_time": timestamp(a.decide_time.as_ref()),
    })
}

pub fn queue_stats(s: &sched::GetQueueStatsResponse) -> Value {
    json!({
        "queued": s.queued,
        "running": s.running,
        "awaiting_approval": s.awaiting_approval,
        "by_user": s.by_user.iter().map(|u| json!({
            "owner": u.owner,
            "queued": u.queued,
            "running": u.running,
            "gpus_in_use": u.gpus_in_use,
        })).collect::<Vec<_>>(),
        "average_wait": duration(s.average_wait.as_ref()),
        "runners": s.runners,
        "gpus_total": s.gpus_total,
        "gpus_in_use": s.gpus_in_use,
        "held": s.held,
    })
}

fn evidence(e: &diag::Evidence) -> Value {
    json!({ "source": e.source, "line_number": e.line_number, "text": e.text })
}

fn llm_analysis(a: &diag::LlmAnalysis) -> Value {
    let status = enum_value(
        diag::LlmStatus::try_from(a.status)
            .ok()
            .map(|e| e.as_str_name()),
        a.status,
    );
    json!({
        "kind": a.kind,
        "replica": a.replica,
        "status": status,
        "status_reason": a.status_reason,
        "healthy": a.healthy,
        "error": a.error,
        "analysis": a.analysis,
        "solution": a.solution,
        "raw_text": a.raw_text,
        "prompt_version": a.prompt_version,
        "prompt_sha256": a.prompt_sha256,
        "model": a.model,
        "attempt": a.attempt,
        "cached": a.cached,
    })
}

pub fn diagnosis(d: &diag::Diagnosis) -> Value {
    json!({
        "id": d.id,
        "job_id": d.job_id,
        "healthy": d.healthy,
        "error": d.error,
        "analysis": d.analysis,
        "solution": d.solution,
        "text": d.text,
        "category": d.category,
        "evidence": d.evidence.iter().map(evidence).collect::<Vec<_>>(),
        "findings": d.findings.iter().map(|f| json!({
            "rule_id": f.rule_id,
            "layer": layer(f.layer),
            "category": f.category,
            "summary": f.summary,
            "hint": f.hint,
            "evidence": f.evidence.iter().map(evidence).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "llm_text": d.llm_text,
        "llm_analyses": d.llm_analyses.iter().map(llm_analysis).collect::<Vec<_>>(),
        "prompt_version": d.prompt_version,
        "create_time": timestamp(d.create_time.as_ref()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(seconds: i64, nanos: i32) -> prost_types::Timestamp {
        prost_types::Timestamp { seconds, nanos }
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(
            timestamp(Some(&ts(1_700_000_000, 0))),
            json!("2023-11-14T22:13:20Z")
        );
        assert_eq!(
            timestamp(Some(&ts(1_700_000_000, 250_000_000))),
            json!("2023-11-14T22:13:20.250Z")
        );
        assert_eq!(timestamp(None), Value::Null);
        assert_eq!(timestamp(Some(&ts(0, -1))), Value::Null);
    }

    #[test]
    fn durations_follow_proto_json() {
        let d = |seconds, nanos| duration(Some(&prost_types::Duration { seconds, nanos }));
        assert_eq!(d(30, 0), json!("30s"));
        assert_eq!(d(1, 500_000_000), json!("1.5s"));
        assert_eq!(d(0, 1_000), json!("0.000001s"));
        assert_eq!(d(0, -500_000_000), json!("-0.5s"));
    }

    #[test]
    fn enums_use_full_proto_names_and_numbers_when_unknown() {
        assert_eq!(
            job_state(pb::JobState::Running as i32),
            json!("JOB_STATE_RUNNING")
        );
        assert_eq!(job_state(99), json!(99));
    }

    #[test]
    fn non_finite_metric_values_are_strings() {
        let p = metrics::MetricPoint {
            key: "loss".into(),
            step: 3,
            value: f64::NAN,
            time: Some(ts(1_700_000_000, 0)),
            non_finite: true,
        };
        let v = metric_point(&p);
        assert_eq!(v["value"], json!("NaN"));
        assert_eq!(v["time"], json!("2023-11-14T22:13:20Z"));
        assert_eq!(float(f64::NEG_INFINITY), json!("-Infinity"));
        assert_eq!(float(0.5), json!(0.5));
    }

    #[test]
    fn job_json_carries_state_spec_and_error() {
        let j = pb::Job {
            id: "j1".into(),
            owner: "alice".into(),
            state: pb::JobState::Failed as i32,
            failure_cause: pb::FailureCause::UserCode as i32,
            error_message: "Error Type: RuntimeError\nError Message: boom".into(),
            spec: Some(pb::JobSpec {
                name: "n".into(),
                command: vec!["echo".into()],
                deadline: Some(prost_types::Duration {
                    seconds: 60,
                    nanos: 0,
                }),
                ..Default::default()
            }),
            error: Some(pb::JobError {
                r#type: "RuntimeError".into(),
                exit_code: 1,
                ..Default::default()
            }),
            attempts: vec![pb::Attempt {
                number: 1,
                exit_code: Some(1),
                state: pb::AttemptState::Failed as i32,
                ..Default::default()
            }],
            ..Default::default()
        };
        let v = job(&j);
        assert_eq!(v["state"], json!("JOB_STATE_FAILED"));
        assert_eq!(v["failure_cause"], json!("FAILURE_CAUSE_USER_CODE"));
        assert_eq!(v["spec"]["deadline"], json!("60s"));
        assert_eq!(v["spec"]["resources"], Value::Null);
        assert_eq!(v["error"]["type"], json!("RuntimeError"));
        assert_eq!(v["attempts"][0]["exit_code"], json!(1));
        assert_eq!(v["attempts"][0]["state"], json!("ATTEMPT_STATE_FAILED"));
        assert_eq!(v["create_time"], Value::Null);
    }

    #[test]
    fn limits_and_explanations_use_proto_names_and_null_for_no_limit() {
        let l = sched::Limits {
            scope: sched::LimitScope::User as i32,
            subject: "alice".into(),
            max_running_jobs: Some(4),
            ..Default::default()
        };
        assert_eq!(
            limits(&l),
            json!({
                "scope": "LIMIT_SCOPE_USER",
                "subject": "alice",
                "max_running_jobs": 4,
                "max_gpus": null,
                "max_queued_jobs": null,
            })
        );
        let e = sched::ExplainJobResponse {
            job_id: "j".into(),
            state: pb::JobState::AwaitingApproval as i32,
            causes: vec![sched::BlockingCause {
                reason: sched::PendingReason::AwaitingApproval as i32,
                detail: "rule `big-gpu-jobs`".into(),
                unblock: "an approver (role approver) runs `trainctl approve j`".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let v = explanation(&e);
        assert_eq!(v["state"], "JOB_STATE_AWAITING_APPROVAL");
        assert_eq!(v["causes"][0]["reason"], "PENDING_REASON_AWAITING_APPROVAL");
        assert_eq!(v["causes"][0]["scope"], "LIMIT_SCOPE_UNSPECIFIED");
        assert_eq!(v["estimated_wait"], Value::Null);
        let a = approval(&sched::Approval {
            state: sched::ApprovalState::Expired as i32,
            ..Default::default()
        });
        assert_eq!(a["state"], "APPROVAL_STATE_EXPIRED");
        assert_eq!(a["decide_time"], Value::Null);
        let st = queue_stats(&sched::GetQueueStatsResponse {
            held: true,
            average_wait: Some(prost_types::Duration {
                seconds: 30,
                nanos: 0,
            }),
            ..Default::default()
        });
        assert_eq!(
            (st["held"].clone(), st["average_wait"].clone()),
            (json!(true), json!("30s"))
        );
    }
}
