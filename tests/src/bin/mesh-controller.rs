//! The controller under test: the real `mesh-controller` entry point, built inside this
//! package so the tests and the single-machine mesh can find it next to the agent.
fn main() -> std::process::ExitCode {
    mesh_controller::cli::main()
}
