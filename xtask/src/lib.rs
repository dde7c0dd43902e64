//! What `cargo xtask` shares with the tests: the plain manifests rendered from the Helm chart
//! and where the chart's tools are.
#![forbid(unsafe_code)]

pub mod manifests;
pub mod tools;
