//! Sources of truth.
pub mod gateway_api;
pub mod kube;
pub mod local;
