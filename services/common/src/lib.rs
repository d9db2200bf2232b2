//! What every trainmesh service does the same way.
//!
//! - [`telemetry`]: `tracing` set up from `TRAINMESH_LOG_*` and OTLP export;
//!   [`log_file`]: the log file, rotated by size.
//! - [`correlation`]: the `x-correlation-id` / `traceparent` server layer and
//!   the client interceptor that carries both on every outgoing call.
//! - [`auth`]: bearer tokens (stored hashed) mapped to a [`auth::Caller`],
//!   from tokens files and a token database that every service reloads.
//! - [`audit`]: the audit log every service keeps of people's changes.
//! - [`error`]: the one mapping from a service's error codes to `tonic::Status`.
//! - [`server`]: the one server builder (health, reflection, layers, limits,
//!   graceful shutdown).
//! - [`inbound`]: oversized requests and a per-caller cap on open streams.
//! - [`stream`]: server streams that end with UNAVAILABLE (and the cursor
//!   to resume from) when the server shuts down.
//! - [`db`]: sqlx pools for SQLite (default) and PostgreSQL, and migrations.
//! - [`storage`]: write transactions that survive storage errors, and
//!   the storage health that `grpc.health.v1` reports.
//! - [`outbox`]: a transactional outbox relay for calls to other services.
//! - [`group_commit`]: many small write transactions sharing one commit.
//! - [`spec`]: the one validation of a job spec, with every limit;
//!   [`text`]: checks on caller-supplied strings.
//! - [`healthcheck`]: `<binary> healthcheck ADDR`, for container health
//!   checks.
//! - [`tls`]: TLS for servers and clients, and the refusal of plaintext off
//!   loopback.
//! - [`testing`]: helpers for tests that start real servers.

pub mod audit;
pub mod auth;
pub mod client;
pub mod config;
pub mod correlation;
pub mod db;
pub mod error;
pub mod group_commit;
pub mod healthcheck;
pub mod id;
pub mod inbound;
pub mod log_file;
pub mod logline;
pub mod outbox;
pub mod sealed;
pub mod server;
pub mod spec;
pub mod storage;
pub mod stream;
pub mod telemetry;
pub mod testing;
pub mod text;
pub mod time;
pub mod tls;

pub use trainmesh_proto as proto;
