//! metrics-service (being written).
