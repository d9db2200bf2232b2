//! scheduler-service (being written).
