//! `mesh-agent`: the node agent and its debugging commands.
fn main() -> std::process::ExitCode {
    mesh_agent::cli::main()
}
