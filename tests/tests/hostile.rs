//! The hostile suite: each test is an attack a tenant, a pod, a stolen credential or a crash
//! could try against the mesh, run with unmodified tools on the single-machine mesh (or, where
//! the attack is on one component, against that component in process), asserting that it
//! fails. Privileged where it needs the simulated cluster.

mod common;
#[path = "hostile/datapath.rs"]
mod datapath;
