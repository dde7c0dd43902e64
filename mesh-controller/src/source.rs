//! Sources of truth.
pub mod kube;
pub mod local;
