//! The hostile suite: each test is an attack a tenant, a pod, a stolen credential or a crash
//! could try against the mesh, run with unmodified tools on the single-machine mesh (or, where
//! the attack is on one component, against that component in process), asserting that it
//! fails. Privileged where it needs the simulated cluster.

#[allow(dead_code, reason = "each suite uses a subset")]
mod common;
#[path = "hostile/control.rs"]
mod control;
#[path = "hostile/datapath.rs"]
mod datapath;
#[path = "hostile/handover.rs"]
mod handover;
#[path = "hostile/l7.rs"]
mod l7;
#[path = "hostile/revoke.rs"]
mod revoke;
