//! Harness for cross-service tests (being written).
