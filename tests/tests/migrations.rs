//! Start-up of several replicas of a service at the same moment against one
//! database: every replica's `db::open` succeeds, and the schema is built
//! exactly once (each migration recorded once, the storage probe's row
//! once, the same tables, columns and indexes as a database opened by one
//! replica alone). Then the same with two real scheduler-service processes.
//!
//! The PostgreSQL cases need TRAINMESH_TEST_POSTGRES_URL; without it they
//! say so and pass, except under CI, where they fail.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::Row;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use trainmesh_common::db::{self, Backend, Db, Durability};
use trainmesh_common::testing::{postgres_db, sqlite_db, wait_for, TestDb, POSTGRES_ENV};
use trainmesh_tests::{Mesh, MeshOptions, SCHEDULER_2};

/// Replicas started at once in the in-process tests.
const REPLICAS: usize = 8;
/// Fresh databases per service and backend: one start-up does not always
/// lose a race that is there.
const ROUNDS: usize = 3;

struct Service {
    name: &'static str,
    sqlite: Migrator,
    postgres: Migrator,
}

/// Each service's migrations, as its `run` embeds them.
fn services() -> [Service; 4] {
    [
        Service {
            name: "job-service",
            sqlite: sqlx::migrate!("../services/job-service/migrations/sqlite"),
            postgres: sqlx::migrate!("../services/job-service/migrations/postgres"),
        },
        Service {
            name: "scheduler-service",
            sqlite: sqlx::migrate!("../services/scheduler-service/migrations/sqlite"),
            postgres: sqlx::migrate!("../services/scheduler-service/migrations/postgres"),
        },
        Service {
            name: "metrics-service",
            sqlite: sqlx::migrate!("../services/metrics-service/migrations/sqlite"),
            postgres: sqlx::migrate!("../services/metrics-service/migrations/postgres"),
        },
        Service {
            name: "diagnosis-service",
            sqlite: sqlx::migrate!("../services/diagnosis-service/migrations/sqlite"),
            postgres: sqlx::migrate!("../services/diagnosis-service/migrations/postgres"),
        },
    ]
}

fn in_ci() -> bool {
    std::env::var("CI")
        .map(|v| !v.is_empty() && v != "false" && v != "0")
        .unwrap_or(false)
}

/// Whether a PostgreSQL server is configured; outside CI, a test without
/// one says so and passes.
fn postgres_configured(test: &str) -> bool {
    let set = std::env::var(POSTGRES_ENV).is_ok_and(|v| !v.is_empty());
    if !set {
        assert!(!in_ci(), "{test} needs {POSTGRES_ENV} under CI");
        eprintln!("{test}: {POSTGRES_ENV} is not set; skipped");
    }
    set
}

/// Tables, columns and indexes, in an order that does not depend on which
/// replica created what.
async fn schema(db: &Db) -> BTreeSet<String> {
    let sql = match db.backend {
        Backend::Sqlite => {
            "SELECT type || ' ' || name || ' ' || COALESCE(sql, '') FROM sqlite_master \
             WHERE name NOT LIKE 'sqlite_%'"
        }
        Backend::Postgres => {
            "SELECT 'column ' || table_name || '.' || column_name || ' ' || data_type \
               || ' ' || is_nullable || ' ' || COALESCE(column_default, '') \
             FROM information_schema.columns WHERE table_schema = 'public' \
             UNION ALL \
             SELECT 'index ' || tablename || ' ' || indexdef FROM pg_indexes \
             WHERE schemaname = 'public'"
        }
    };
    sqlx::query(sql)
        .fetch_all(&db.read)
        .await
        .expect("read the schema")
        .iter()
        .map(|r| r.get::<String, _>(0))
        .collect()
}

/// (version, success) of every migration the database records as applied.
async fn applied(db: &Db) -> Vec<(i64, bool)> {
    // The Any driver decodes no SQLite booleans: compare as integers.
    sqlx::query(
        "SELECT version, CAST(CASE WHEN success THEN 1 ELSE 0 END AS BIGINT) \
         FROM _sqlx_migrations ORDER BY version",
    )
    .fetch_all(&db.read)
    .await
    .expect("read _sqlx_migrations")
    .iter()
    .map(|r| (r.get(0), r.get::<i64, _>(1) == 1))
    .collect()
}

async fn probe_rows(db: &Db) -> i64 {
    sqlx::query("SELECT COUNT(*) FROM storage_probe")
        .fetch_one(&db.read)
        .await
        .expect("count storage_probe rows")
        .get(0)
}

/// The schema one replica builds alone on a fresh database.
async fn reference_schema(service: &Service, fresh: &TestDb) -> BTreeSet<String> {
    let db = db::open(
        &fresh.url,
        Durability::Full,
        &service.sqlite,
        &service.postgres,
    )
    .await
    .expect("open the reference database");
    schema(&db).await
}

/// Opens `url` from `REPLICAS` tasks at once, as replicas starting together
/// would, and checks the outcome against `want`, the schema one replica
/// builds alone.
async fn open_together(service: &Arc<Service>, url: &str, want: &BTreeSet<String>) {
    let opens = (0..REPLICAS).map(|_| {
        let url = url.to_owned();
        let service = service.clone();
        tokio::spawn(async move {
            db::open(&url, Durability::Full, &service.sqlite, &service.postgres).await
        })
    });
    let results = futures::future::join_all(opens).await;
    let mut dbs = Vec::new();
    let mut failed = Vec::new();
    for (i, r) in results.into_iter().enumerate() {
        match r.expect("open task") {
            Ok(db) => dbs.push(db),
            Err(e) => failed.push(format!("replica {i}: {e:#}")),
        }
    }
    assert!(
        failed.is_empty(),
        "{}: {} of {REPLICAS} replicas failed to open:\n{}",
        service.name,
        failed.len(),
        failed.join("\n")
    );
    let db = &dbs[0];
    let what = format!("{} on {:?}", service.name, db.backend);
    let migrations: Vec<(i64, bool)> = match db.backend {
        Backend::Sqlite => &service.sqlite,
        Backend::Postgres => &service.postgres,
    }
    .iter()
    .map(|m| (m.version, true))
    .collect();
    assert_eq!(applied(db).await, migrations, "{what}: each migration once");
    assert_eq!(probe_rows(db).await, 1, "{what}: one probe row");
    assert_eq!(
        &schema(db).await,
        want,
        "{what}: the same schema as one replica builds alone"
    );
    // Every replica can write.
    for replica in &dbs {
        sqlx::query("UPDATE storage_probe SET written_at = written_at + 1 WHERE id = 1")
            .execute(&replica.write)
            .await
            .unwrap_or_else(|e| panic!("{what}: a replica cannot write: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_opening_one_fresh_sqlite_file_together_all_start_and_migrate_once() {
    for service in services() {
        let service = Arc::new(service);
        let want = reference_schema(&service, &sqlite_db()).await;
        for _ in 0..ROUNDS {
            open_together(&service, &sqlite_db().url, &want).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_opening_one_fresh_postgres_database_together_all_start_and_migrate_once() {
    if !postgres_configured("replicas_opening_one_fresh_postgres_database_together") {
        return;
    }
    for service in services() {
        let service = Arc::new(service);
        let fresh = || async { postgres_db().await.expect("a fresh database") };
        let want = reference_schema(&service, &fresh().await).await;
        for _ in 0..ROUNDS {
            open_together(&service, &fresh().await.url, &want).await;
        }
    }
}

async fn health(mesh: &Mesh, instance: &str) -> Option<ServingStatus> {
    let ch = mesh.endpoint_channel(instance, None);
    let resp = HealthClient::new(ch)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .ok()?;
    ServingStatus::try_from(resp.into_inner().status).ok()
}

/// Two scheduler-service processes started at once against one fresh
/// PostgreSQL database, as Kubernetes starts two replicas, both reading
/// their tokens from one more fresh database (the `auth_tokens` table is
/// created at start too): both become SERVING, and the schema is built
/// once.
#[tokio::test]
async fn two_scheduler_processes_started_together_on_a_fresh_postgres_database_both_serve() {
    if !postgres_configured("two_scheduler_processes_started_together") {
        return;
    }
    let tokens = postgres_db().await.expect("a fresh tokens database");
    // The harness spawns both schedulers before it waits for either, and
    // fails if one exits.
    let mesh = Mesh::start_with(
        MeshOptions {
            no_runner: true,
            postgres: true,
            scheduler_replicas: 2,
            ..Default::default()
        }
        .arg("scheduler-service", &["--tokens", &tokens.url]),
    )
    .await;
    for instance in ["scheduler-service", SCHEDULER_2] {
        wait_for(
            &format!("{instance} to report SERVING"),
            Duration::from_secs(30),
            || async {
                (health(&mesh, instance).await == Some(ServingStatus::Serving)).then_some(())
            },
        )
        .await;
    }

    let scheduler = services()
        .into_iter()
        .find(|s| s.name == "scheduler-service")
        .expect("the scheduler's migrations");
    let db = db::connect(&mesh.postgres_urls()[1], Durability::Full)
        .await
        .expect("connect to the scheduler's database");
    let want: Vec<(i64, bool)> = scheduler
        .postgres
        .iter()
        .map(|m| (m.version, true))
        .collect();
    assert_eq!(applied(&db).await, want, "each migration once");
    assert_eq!(probe_rows(&db).await, 1, "one probe row");
    let tokens_db = db::connect(&tokens.url, Durability::Full)
        .await
        .expect("connect to the tokens database");
    let rows: i64 = sqlx::query("SELECT COUNT(*) FROM auth_tokens")
        .fetch_one(&tokens_db.read)
        .await
        .expect("the auth_tokens table exists")
        .get(0);
    assert_eq!(rows, 0);

    for (instance, status) in mesh.stop().await {
        assert!(status.success(), "{instance} exited with {status}");
    }
}
