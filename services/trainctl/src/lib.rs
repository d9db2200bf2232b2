//! trainctl (being written).
