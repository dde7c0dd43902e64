//! The mesh's pure model, shared by the agent and the controller.
//!
//! Nothing here does I/O: identities ([`identity`]), the resources the mesh routes between
//! ([`model`]), the SMI documents it reads ([`smi`]) and the compiled policy with its one
//! decision function ([`policy::authorize`]).
#![forbid(unsafe_code)]

pub mod gateway;
pub mod http_path;
pub mod identity;
pub mod meta;
pub mod model;
pub mod policy;
pub mod resolve;
pub mod route;
pub mod smi;

pub use identity::SpiffeId;
