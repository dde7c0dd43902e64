//! The agent<->controller API: generated protobuf messages and tonic services ([`v1`]), and
//! the conversions between them and the mesh-core model ([`convert`]). Wire types stay at the
//! boundary: everything past it works on mesh-core types.
#![forbid(unsafe_code)]

pub mod convert;

#[allow(clippy::all, reason = "generated code, whatever it trips")]
pub mod v1 {
    tonic::include_proto!("mesh.v1");
}
