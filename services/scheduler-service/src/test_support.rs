//! Helpers for the crate's database tests.

use sqlx::AnyConnection;
use trainmesh_common::db::{self, Db, Durability};
use trainmesh_common::testing::TestDb;

use crate::domain::{Demand, EntryState, JobId, NewEntry};
use crate::repo;

pub async fn open(t: &TestDb) -> Db {
    db::open(
        &t.url,
        Durability::Full,
        &sqlx::migrate!("./migrations/sqlite"),
        &sqlx::migrate!("./migrations/postgres"),
    )
    .await
    .expect("open test database")
}

pub fn entry() -> NewEntry {
    NewEntry {
        job_id: JobId::new(),
        owner: "alice".into(),
        org: "ml".into(),
        priority: 0,
        demand: Demand {
            gpus: 1,
            gpu_type: String::new(),
            cpu_milli: 0,
            memory_mib: 0,
        },
        spec: Vec::new(),
        max_attempts: None,
        correlation_id: "c".into(),
        submit_time: None,
        image: "img".into(),
        labels: Default::default(),
        deadline: None,
    }
}

pub async fn insert(conn: &mut AnyConnection, e: &NewEntry) {
    assert!(
        repo::insert_entry(conn, e, EntryState::Queued, 3, "c", 1, 1)
            .await
            .expect("insert")
    );
}

pub async fn enqueue(db: &Db) -> JobId {
    let e = entry();
    insert(&mut db.write.acquire().await.expect("conn"), &e).await;
    e.job_id
}
