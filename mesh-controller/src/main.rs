//! `mesh-controller`: the cluster controller.
//!
//! It is the mesh's certificate authority (SPIFFE workload certificates, node-bound signing),
//! compiles SMI and Gateway API resources into per-node configuration, and streams it to the
//! node agents over gRPC (port 15012). Sources of truth are the Kubernetes API or a local
//! directory of the same YAML. Those parts land with the identity and control-plane work; today
//! the binary only identifies itself.
use clap::Parser;

#[derive(Parser)]
#[command(
    name = "mesh-controller",
    version,
    about = "Cluster controller of the mesh"
)]
struct Cli {}

fn main() {
    let _ = Cli::parse();
    eprintln!("mesh-controller: the CA and configuration server are not built yet");
    std::process::exit(69);
}
