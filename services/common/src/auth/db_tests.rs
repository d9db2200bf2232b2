use std::sync::Arc;
use std::time::Duration;

use super::managed::{self, NewToken, Revoked, TokenRow};
use super::*;
use crate::db::{connect, Db, Durability};
use crate::proto::auth::v1 as pb;
use crate::testing::{all_dbs, wait_for};
use crate::time::{now_micros, OffsetClock};

fn request(user: &str, roles: &[&str]) -> pb::CreateTokenRequest {
    pb::CreateTokenRequest {
        user: user.into(),
        org: "ml".into(),
        roles: roles.iter().map(|r| r.to_string()).collect(),
        ..Default::default()
    }
}

async fn create(db: &Db, req: &pb::CreateTokenRequest) -> (TokenRow, String) {
    let now = now_micros();
    let new = NewToken::parse(req, now).expect("valid request");
    let mut tx = db.begin_write().await.unwrap();
    let made = managed::create(&mut tx, &new, "admin", now).await.unwrap();
    tx.commit().await.unwrap();
    made
}

async fn revoke(db: &Db, id: &str) -> Revoked {
    let mut tx = db.begin_write().await.unwrap();
    let r = managed::revoke(&mut tx, id, "admin", now_micros())
        .await
        .unwrap();
    tx.commit().await.unwrap();
    r
}

#[test]
fn tokens_are_looked_up_by_hash() {
    let file = TokensFile::default().with("secret", "alice", "ml", &[Role::User]);
    assert_ne!(file.tokens[0].sha256, "secret");
    let store = TokenStore::from_entries(file.tokens).unwrap();
    assert_eq!(store.authenticate("secret").unwrap().user, "alice");
    assert_eq!(store.authenticate("other"), Err(Refusal::Unknown));
}

#[tokio::test]
async fn a_created_token_works_and_a_revoked_one_is_refused_saying_so() {
    for tdb in all_dbs().await {
        // The writer (job-service) and a reader (any other service).
        let writer = TokenStore::load(&tdb.url).await.unwrap();
        let reader = TokenStore::load(&tdb.url).await.unwrap();
        let db = writer.database().unwrap().clone();
        let (row, secret) = create(&db, &request("gina", &["user", "approver", "user"])).await;
        assert_eq!(row.roles, ["user", "approver"], "duplicates are dropped");
        assert_ne!(row.sha256, secret);
        assert!(secret.starts_with("tm_") && row.id.starts_with("tok_"));

        writer.apply(&row).await;
        let caller = writer.authenticate(&secret).expect("at once in the writer");
        assert_eq!(caller.user, "gina", "{}", tdb.label);
        assert_eq!(caller.roles, [Role::User, Role::Approver]);
        // The reader's own poll may have loaded it already; either way,
        // after a reload it has it, and a second finds nothing new.
        reader.reload().await.unwrap();
        assert!(!reader.reload().await.unwrap(), "nothing changed since");
        assert_eq!(reader.authenticate(&secret).unwrap().org, "ml");

        let Revoked::Now(revoked) = revoke(&db, &row.id).await else {
            panic!("{}: the token was not revoked", tdb.label);
        };
        assert!(matches!(revoke(&db, &row.id).await, Revoked::Already(_)));
        assert_eq!(revoke(&db, "tok_nope").await, Revoked::NotFound);
        writer.apply(&revoked).await;
        let why = Refusal::Revoked { id: row.id.clone() };
        assert_eq!(writer.authenticate(&secret), Err(why.clone()));
        assert!(why.to_string().contains("revoked"));
        reader.reload().await.unwrap();
        assert_eq!(reader.authenticate(&secret), Err(why), "{}", tdb.label);
    }
}

#[tokio::test]
async fn other_stores_pick_up_changes_on_their_own() {
    for tdb in all_dbs().await {
        let reader = TokenStore::load(&tdb.url).await.unwrap();
        let db = connect(&tdb.url, Durability::Full).await.unwrap();
        let (row, secret) = create(&db, &request("hank", &["user"])).await;
        wait_for(
            "the poll to load the new token",
            Duration::from_secs(5),
            || {
                let ok = reader.authenticate(&secret).is_ok();
                async move { ok.then_some(()) }
            },
        )
        .await;
        revoke(&db, &row.id).await;
        wait_for(
            "the poll to load the revocation",
            Duration::from_secs(5),
            || {
                let refused = matches!(reader.authenticate(&secret), Err(Refusal::Revoked { .. }));
                async move { refused.then_some(()) }
            },
        )
        .await;
    }
}

#[tokio::test]
async fn expiry_is_checked_at_each_authentication() {
    for tdb in all_dbs().await {
        let clock = OffsetClock::default();
        let store = TokenStore::load_db_with(&tdb.url, Arc::new(clock.clone()))
            .await
            .unwrap();
        let mut req = request("ivy", &["user"]);
        req.ttl = Some(prost_types::Duration {
            seconds: 60,
            nanos: 0,
        });
        let (row, secret) = create(store.database().unwrap(), &req).await;
        store.apply(&row).await;
        assert!(store.authenticate(&secret).is_ok(), "{}", tdb.label);
        clock.advance(Duration::from_secs(61));
        let refused = store.authenticate(&secret).unwrap_err();
        assert!(matches!(refused, Refusal::Expired { ref id, .. } if *id == row.id));
        assert!(refused.to_string().contains("expired at"), "{refused}");
    }
}

#[tokio::test]
async fn last_use_is_recorded_and_listing_pages_by_creation() {
    for tdb in all_dbs().await {
        let store = TokenStore::load(&tdb.url).await.unwrap();
        let db = store.database().unwrap().clone();
        let mut made = Vec::new();
        for user in ["a1", "a2", "b1"] {
            made.push(create(&db, &request(user, &["user"])).await);
        }
        store.reload().await.unwrap();
        store.authenticate(&made[1].1).unwrap();
        store.flush_usage().await;

        let first = managed::list(&db, "", None, 2).await.unwrap();
        assert_eq!(first.len(), 2, "{}", tdb.label);
        let after = managed::decode_page_token(&managed::encode_page_token(&first[1])).unwrap();
        let rest = managed::list(&db, "", after, 2).await.unwrap();
        let users: Vec<_> = first.iter().chain(&rest).map(|t| t.user.as_str()).collect();
        assert_eq!(users, ["a1", "a2", "b1"]);
        assert!(first[1].last_used_at.is_some(), "{}", tdb.label);
        assert!(first[0].last_used_at.is_none());
        let only = managed::list(&db, "b1", None, 10).await.unwrap();
        assert_eq!(only.len(), 1);
        let shown = only[0].proto();
        assert_eq!((shown.user.as_str(), shown.revoked), ("b1", false));
        assert!(managed::decode_page_token("x").is_err());
    }
}

#[test]
fn bad_create_requests_name_the_field() {
    let now = now_micros();
    let field = |r: pb::CreateTokenRequest| NewToken::parse(&r, now).unwrap_err().field;
    assert_eq!(field(request("", &["user"])), "user");
    assert_eq!(field(request("al ice", &["user"])), "user");
    assert_eq!(field(request(&"a".repeat(129), &["user"])), "user");
    let mut r = request("alice", &["user"]);
    r.org = " ".into();
    assert_eq!(field(r), "org");
    assert_eq!(field(request("alice", &[])), "roles");
    assert_eq!(field(request("alice", &["user", "root"])), "roles[1]");
    let mut r = request("alice", &["user"]);
    r.description = "x".repeat(1025);
    assert_eq!(field(r), "description");
    let mut r = request("alice", &["user"]);
    r.expire_time = Some(crate::time::to_timestamp(now - 1));
    assert_eq!(field(r), "expire_time");
    let mut r = request("alice", &["user"]);
    r.ttl = Some(prost_types::Duration {
        seconds: -5,
        nanos: 0,
    });
    assert_eq!(field(r), "ttl");
    let mut r = request("alice", &["user"]);
    r.ttl = Some(prost_types::Duration {
        seconds: 5,
        nanos: 0,
    });
    r.expire_time = Some(crate::time::to_timestamp(now + 10_000_000));
    assert_eq!(field(r), "ttl");
    let ok = NewToken::parse(&request("alice@example.com", &["admin"]), now).unwrap();
    assert_eq!(ok.expires_at, None);
}

#[tokio::test]
async fn files_and_one_database_combine() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens.yaml");
    TokensFile::default()
        .with("boot", "admin", "ops", &[Role::Admin])
        .write(&file)
        .unwrap();
    let db = crate::db::sqlite_url(dir.path(), "auth.db");
    let sources = [file.display().to_string(), db.clone()];
    let store = TokenStore::load_sources(&sources).await.unwrap();
    assert_eq!(store.authenticate("boot").unwrap().user, "admin");
    assert!(store.database().is_some());
    let two = [db.clone(), crate::db::sqlite_url(dir.path(), "other.db")];
    let err = TokenStore::load_sources(&two).await.unwrap_err();
    assert!(err.to_string().contains("more than one"), "{err}");
}

#[tokio::test]
async fn tokens_load_from_a_database_table() {
    for db in all_dbs().await {
        let store = TokenStore::load(&db.url).await.expect("empty table loads");
        assert!(store.authenticate("t1").is_err(), "{}", db.label);
        let pool = connect(&db.url, Durability::Full).await.unwrap();
        sqlx::query("INSERT INTO auth_tokens VALUES ($1, $2, $3, $4)")
            .bind(hash_token("t1"))
            .bind("dana")
            .bind("vision")
            .bind("user, approver")
            .execute(&pool.write)
            .await
            .unwrap();
        let store = TokenStore::load(&db.url).await.expect("loads");
        let caller = store.authenticate("t1").expect("known token");
        assert_eq!(caller.user, "dana", "{}", db.label);
        assert_eq!(caller.roles, vec![Role::User, Role::Approver]);
        sqlx::query("UPDATE auth_tokens SET roles = 'superuser'")
            .execute(&pool.write)
            .await
            .unwrap();
        let err = TokenStore::load(&db.url).await.expect_err("unknown role");
        assert!(err.to_string().contains("superuser"), "{err}");
    }
}

/// Every replica of every service loads its tokens at start, possibly
/// from one shared database that none of them has created the tables in.
/// A lost race is not certain in one round, so the tables are dropped
/// and the replicas race again, many times.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_loading_tokens_together_from_a_fresh_database_all_load() {
    for db in all_dbs().await {
        let admin = connect(&db.url, Durability::Full).await.unwrap();
        for round in 0..20 {
            for table in [
                "auth_tokens",
                "managed_tokens",
                "managed_tokens_version",
                "auth_audit_events",
            ] {
                sqlx::query(&format!("DROP TABLE IF EXISTS {table}"))
                    .execute(&admin.write)
                    .await
                    .unwrap();
            }
            let loads = (0..8).map(|_| {
                let url = db.url.clone();
                tokio::spawn(async move { TokenStore::load(&url).await })
            });
            let failed: Vec<String> = futures::future::join_all(loads)
                .await
                .into_iter()
                .filter_map(|r| r.expect("load task").err().map(|e| format!("{e:#}")))
                .collect();
            assert!(failed.is_empty(), "{} round {round}: {failed:#?}", db.label);
        }
    }
}
