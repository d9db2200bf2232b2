use trainmesh_common::db::Backend;
use trainmesh_common::testing::{all_dbs, postgres_db};

use super::*;
use crate::domain::RunnerId;
use crate::test_support::{enqueue, entry, insert, open};

fn ids(c: &QueueCache) -> std::collections::BTreeSet<JobId> {
    c.waiting().keys().copied().collect()
}

#[tokio::test]
async fn follows_every_change_after_one_full_load() {
    for t in all_dbs().await {
        let db = open(&t).await;
        let (a, b, c) = (enqueue(&db).await, enqueue(&db).await, enqueue(&db).await);
        let mut cache = QueueCache::new();
        cache.refresh(&db).await.expect("full load");
        assert_eq!(ids(&cache), [a, b, c].into(), "{}", t.label);

        // A dispatch, a cancel request and a new job, by other code paths.
        let mut conn = db.write.acquire().await.expect("conn");
        let placed = repo::dispatch_entries(&mut conn, &[(a, RunnerId::new())], 2)
            .await
            .expect("dispatch");
        assert!(placed.contains_key(&a), "{}", t.label);
        repo::request_entry_cancel(&mut conn, b, "cancelled", 2)
            .await
            .expect("cancel");
        drop(conn);
        let d = enqueue(&db).await;
        cache.refresh(&db).await.expect("delta");
        assert_eq!(ids(&cache), [c, d].into(), "{}", t.label);

        // Nothing changed: still the same.
        cache.refresh(&db).await.expect("empty delta");
        assert_eq!(ids(&cache), [c, d].into(), "{}", t.label);
    }
}

/// A transaction that wrote before a read but committed after it: a
/// counter-based cursor would skip its change for good.
#[tokio::test]
async fn sees_a_change_committed_after_a_later_one_on_postgres() {
    let Some(t) = postgres_db().await else {
        eprintln!("skipped: TRAINMESH_TEST_POSTGRES_URL is not set");
        return;
    };
    let db = open(&t).await;
    assert_eq!(db.backend, Backend::Postgres);
    let mut cache = QueueCache::new();
    cache.refresh(&db).await.expect("full load");

    let slow = entry();
    let mut slow_tx = db.begin_write().await.expect("begin");
    insert(&mut slow_tx, &slow).await;
    let fast = enqueue(&db).await;
    cache.refresh(&db).await.expect("delta");
    assert_eq!(ids(&cache), [fast].into());

    slow_tx.commit().await.expect("commit");
    cache.refresh(&db).await.expect("delta");
    assert_eq!(ids(&cache), [fast, slow.job_id].into());
}
