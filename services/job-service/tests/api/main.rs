//! job-service over real gRPC: each test starts `run` on a port-0 listener
//! with the test tokens, on SQLite and (when TRAINMESH_TEST_POSTGRES_URL is
//! set) PostgreSQL.

mod approvals;
mod audit;
mod create;
mod lifecycle;
mod limits;
mod outbox;
mod sealed;
mod shutdown;
mod support;
mod validation;
mod watch_logs;
