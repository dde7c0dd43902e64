//! The node agent: loads and attaches the datapath, enrolls pods, runs the node proxy, and
//! carries the node debugging commands.
pub mod admin;
pub mod app;
pub mod cli;
pub mod cni;
pub mod config;
pub mod control;
pub mod debug;
pub mod enroll;
pub mod handover;
pub mod uninstall;
