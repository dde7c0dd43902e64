//! The cluster controller: the mesh's certificate authority, the index of cluster state, the
//! policy compiler and the gRPC server the node agents talk to.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod auth;
pub mod ca;
pub mod cli;
pub mod compile;
pub mod config;
pub mod index;
pub mod leader;
pub mod metrics;
pub mod resource;
pub mod server;
pub mod source;
#[cfg(test)]
pub(crate) mod testing;
pub mod trust_bundle;
pub mod uninstall;
