//! Generated gRPC contracts of trainmesh. See `proto/trainmesh/**` for the
//! documented definitions; nothing here is written by hand but [`codec`].

#![allow(clippy::all, clippy::pedantic)]

pub mod codec;

/// Encoded `FileDescriptorSet` of every trainmesh proto and its imports, for
/// server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/trainmesh_descriptor.bin"));

pub mod job {
    pub mod v1 {
        tonic::include_proto!("trainmesh.job.v1");
    }
}
pub mod scheduler {
    pub mod v1 {
        tonic::include_proto!("trainmesh.scheduler.v1");
    }
}
pub mod runner {
    pub mod v1 {
        tonic::include_proto!("trainmesh.runner.v1");
    }
}
pub mod metrics {
    pub mod v1 {
        tonic::include_proto!("trainmesh.metrics.v1");
    }
}
pub mod auth {
    pub mod v1 {
        tonic::include_proto!("trainmesh.auth.v1");
    }
}
pub mod audit {
    pub mod v1 {
        tonic::include_proto!("trainmesh.audit.v1");
    }
}
pub mod diagnosis {
    pub mod v1 {
        tonic::include_proto!("trainmesh.diagnosis.v1");
    }
}
