//! The agent<->controller API: generated protobuf messages and tonic services ([`v1`]), and
//! the conversions between them and the mesh-core model ([`convert`]). Wire types stay at the
//! boundary: everything past it works on mesh-core types.
#![forbid(unsafe_code)]

pub mod convert;

/// A configuration version: the controller's epoch (changes when it restarts) and a per-node
/// sequence number. The domain form of [`v1::Version`], shared by controller and agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Version {
    pub epoch: u64,
    pub seq: u64,
}

impl From<v1::Version> for Version {
    fn from(v: v1::Version) -> Self {
        Version {
            epoch: v.epoch,
            seq: v.seq,
        }
    }
}

impl From<Version> for v1::Version {
    fn from(v: Version) -> Self {
        v1::Version {
            epoch: v.epoch,
            seq: v.seq,
        }
    }
}

#[allow(clippy::all, reason = "generated code, whatever it trips")]
pub mod v1 {
    tonic::include_proto!("mesh.v1");
}
