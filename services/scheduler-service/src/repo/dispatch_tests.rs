use trainmesh_common::testing::all_dbs;

use super::*;
use crate::domain::RunnerId;
use crate::test_support::{enqueue, open};

/// One statement moves many entries: each to its own runner, each with its
/// own attempt and status sequence, and none that may not move.
#[tokio::test]
async fn dispatch_entries_moves_only_dispatchable_entries_each_to_its_runner() {
    for t in all_dbs().await {
        let db = open(&t).await;
        let (a, b, cancelled, backoff) = (
            enqueue(&db).await,
            enqueue(&db).await,
            enqueue(&db).await,
            enqueue(&db).await,
        );
        let (r1, r2) = (RunnerId::new(), RunnerId::new());
        let mut conn = db.write.acquire().await.expect("conn");
        request_entry_cancel(&mut conn, cancelled, "cancelled", 1)
            .await
            .expect("cancel");
        sqlx::query("UPDATE queue_entries SET not_before = 1000 WHERE job_id = $1")
            .bind(backoff.to_string())
            .execute(&mut *conn)
            .await
            .expect("backoff");

        let pairs = [(a, r1), (b, r2), (cancelled, r1), (backoff, r2)];
        let moved = dispatch_entries(&mut conn, &pairs, 10)
            .await
            .expect("dispatch");
        assert_eq!(moved.len(), 2, "{}", t.label);
        for (job, runner) in [(a, r1), (b, r2)] {
            let d = &moved[&job];
            assert_eq!(d.attempt, 1, "{}", t.label);
            // The entry's first status (QUEUED) took the first sequence.
            assert_eq!(d.status_seq, FIRST_STATUS_SEQ + 1, "{}", t.label);
            assert_eq!(d.waited, 9, "{}: queued at 1, dispatched at 10", t.label);
            let e = get_entry(&mut conn, job)
                .await
                .expect("get")
                .expect("entry");
            assert_eq!(e.state, EntryState::Scheduled, "{}", t.label);
            assert_eq!(e.runner_id, Some(runner), "{}", t.label);
        }
        for job in [cancelled, backoff] {
            let e = get_entry(&mut conn, job)
                .await
                .expect("get")
                .expect("entry");
            assert_eq!(e.state, EntryState::Queued, "{}", t.label);
        }
        // A second delivery of the same batch moves nothing.
        let again = dispatch_entries(&mut conn, &pairs, 11)
            .await
            .expect("dispatch again");
        assert!(again.is_empty(), "{}", t.label);
    }
}
