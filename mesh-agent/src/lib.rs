//! The node agent: loads and attaches the datapath, enrolls pods, runs the node proxy, and
//! carries the node debugging commands.
pub mod admin;
pub mod app;
pub mod cli;
pub mod cni;
pub mod config;
pub mod control;
pub mod copy;
pub mod debug;
pub mod enroll;
pub mod hbone;
pub mod identity;
pub mod inbound;
pub mod l7;
pub mod local;
pub mod outbound;
pub mod proxy;
pub mod revocation;
pub mod state;
pub mod telemetry;
pub mod tls;
