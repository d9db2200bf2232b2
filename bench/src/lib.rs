//! trainmesh-bench: measures the performance targets against services started
//! in-process from their libraries, on loopback, with fake runners speaking
//! the real RunnerService protocol over gRPC.
//!
//! Scenarios ([`scenario`]):
//! - `latency`: submit → runner assignment with free capacity (job-service +
//!   scheduler, one CreateJob at a time, the runner's long-poll waiting);
//! - `dispatch`: dispatch decisions per second over 10,000 queued jobs from
//!   100 users with a per-user running limit (scheduler alone, jobs enqueued
//!   with the service token, runners finishing each job at once), plus the
//!   pure `plan()` time on a snapshot of the same size;
//! - `create`: CreateJob calls per second from concurrent clients
//!   (job-service + scheduler).
//!
//! Each runs on SQLite (files in a temp dir) and PostgreSQL (fresh databases
//! on the server named by `--postgres-url` or `TRAINMESH_TEST_POSTGRES_URL`,
//! dropped afterwards).

pub mod cli;
pub mod env;
pub mod report;
pub mod runner;
pub mod scenario;
pub mod stats;
