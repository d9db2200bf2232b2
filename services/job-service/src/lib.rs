//! job-service (being written).
