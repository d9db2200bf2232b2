//! Tables of tokens and audit events.

use trainmesh_common::proto::audit::v1 as audit;
use trainmesh_common::proto::auth::v1 as auth;

use super::{time, Table};

/// `active`, `revoked` or `expired` at `now_secs`.
pub fn token_status(t: &auth::Token, now_secs: i64) -> &'static str {
    if t.revoked {
        "revoked"
    } else if t
        .expire_time
        .as_ref()
        .is_some_and(|e| e.seconds <= now_secs)
    {
        "expired"
    } else {
        "active"
    }
}

pub fn tokens_table(tokens: &[auth::Token], now_secs: i64) -> String {
    let mut t = Table::new([
        "ID",
        "USER",
        "ORG",
        "ROLES",
        "STATUS",
        "CREATED",
        "EXPIRES",
        "LAST USED",
        "DESCRIPTION",
    ]);
    for k in tokens {
        let expires = match &k.expire_time {
            Some(e) => time(Some(e)),
            None => "never".into(),
        };
        t.row([
            k.id.clone(),
            k.user.clone(),
            k.org.clone(),
            k.roles.join(","),
            token_status(k, now_secs).into(),
            time(k.create_time.as_ref()),
            expires,
            time(k.last_use_time.as_ref()),
            k.description.clone(),
        ]);
    }
    t.render()
}

/// `key=value` pairs in key order.
fn details(e: &audit::AuditEvent) -> String {
    let mut pairs: Vec<_> = e.details.iter().collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn audit_table(events: &[audit::AuditEvent]) -> String {
    let mut t = Table::new(["TIME", "SERVICE", "ACTOR", "ACTION", "TARGET", "DETAILS"]);
    for e in events {
        t.row([
            time(e.time.as_ref()),
            e.service.clone(),
            e.actor.clone(),
            e.action.clone(),
            e.target.clone(),
            details(e),
        ]);
    }
    t.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_status_and_audit_details_read_plainly() {
        let mut tok = auth::Token {
            id: "tok_1".into(),
            roles: vec!["user".into(), "approver".into()],
            expire_time: Some(prost_types::Timestamp {
                seconds: 100,
                nanos: 0,
            }),
            ..Default::default()
        };
        assert_eq!(token_status(&tok, 99), "active");
        assert_eq!(token_status(&tok, 100), "expired");
        tok.revoked = true;
        assert_eq!(token_status(&tok, 0), "revoked");
        let table = tokens_table(&[tok], 0);
        assert!(
            table.contains("user,approver") && table.contains("revoked"),
            "{table}"
        );

        let e = audit::AuditEvent {
            action: "cancel_job".into(),
            details: [("reason", "oops"), ("owner", "alice")]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            ..Default::default()
        };
        assert!(audit_table(&[e]).contains("owner=alice reason=oops"));
    }
}
