//! diagnosis-service (being written).
