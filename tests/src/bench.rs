//! The performance ladder (`mesh-bench`, run by `cargo xtask bench`): what the mesh costs, hop
//! by hop, measured on this machine's kernel with the environment recorded beside the figures.
//! See `benches/README.md` for the steps and how to read the numbers.
//!
//! - [`ladder`]: the steps, each a fresh simulated cluster ([`crate::cluster`]), and how each
//!   is measured;
//! - [`client`] and [`server`]: the load generator and the server, the same in every step;
//! - [`env`]: the environment record; [`report`]: JSON, markdown and the comparison of runs;
//!   [`charts`]: SVG charts of a run;
//! - [`stock`]: the stock tools (iperf3, wrk, hey against nginx and iperf3) without and
//!   with the mesh (`--stock`);
//! - [`wire`]: blocking socket and HTTP/1.1 helpers the client and server share.
pub mod charts;
pub mod client;
pub mod env;
pub mod ladder;
pub mod report;
pub mod restart;
pub mod server;
pub mod stock;
pub mod wire;
