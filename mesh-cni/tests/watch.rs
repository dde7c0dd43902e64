//! `mesh-cni install --watch` as the DaemonSet runs it: the plugin comes back into the chain
//! after the primary CNI rewrites its configuration, and stays when the watcher stops.
use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

const CNI: &str = env!("CARGO_BIN_EXE_mesh-cni");

fn chained(conf: &Path) -> bool {
    std::fs::read_to_string(conf)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["plugins"].as_array().cloned())
        .is_some_and(|list| list.last().is_some_and(|p| p["type"] == "mesh-cni"))
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ok() {
        assert!(Instant::now() < deadline, "{what}: not within 10 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_watcher_chains_the_plugin_again_after_the_primary_cni_rewrites_its_conflist() {
    let dir = tempfile::tempdir().expect("dir");
    let (conf_dir, bin_dir) = (dir.path().join("net.d"), dir.path().join("bin"));
    std::fs::create_dir_all(&conf_dir).expect("conf dir");
    std::fs::create_dir_all(&bin_dir).expect("bin dir");
    let conf = conf_dir.join("10-flannel.conflist");
    let primary =
        r#"{"cniVersion":"1.0.0","name":"cbr0","plugins":[{"type":"flannel"},{"type":"portmap"}]}"#;
    std::fs::write(&conf, primary).expect("primary conflist");

    let watcher = Killed(
        Command::new(CNI)
            .args(["install", "--watch", "--watch-interval=1"])
            .arg(format!("--conf-dir={}", conf_dir.display()))
            .arg(format!("--bin-dir={}", bin_dir.display()))
            .arg("--agent-socket=/run/mesh/cni.sock")
            .stdout(Stdio::null())
            .spawn()
            .expect("run mesh-cni install --watch"),
    );
    wait_for("the first install", || chained(&conf));
    assert!(bin_dir.join("mesh-cni").is_file());

    // The primary CNI's upgrade writes its conflist back as it knows it.
    std::fs::write(&conf, primary).expect("rewrite");
    assert!(!chained(&conf));
    wait_for("chained again", || chained(&conf));
    let list: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&conf).expect("read")).expect("json");
    assert_eq!(list["plugins"][0]["type"], "flannel");
    assert_eq!(list["plugins"][1]["type"], "portmap");
    assert_eq!(list["plugins"][2]["agentSocket"], "/run/mesh/cni.sock");

    // The node's plugin directory is emptied: the binary comes back too.
    std::fs::remove_file(bin_dir.join("mesh-cni")).expect("remove binary");
    wait_for("the binary put back", || bin_dir.join("mesh-cni").is_file());

    // Stopping the watcher leaves the plugin in place.
    drop(watcher);
    assert!(
        chained(&conf),
        "the watcher took the plugin out when it stopped"
    );
}

#[test]
fn the_watcher_takes_the_plugin_out_for_good_once_the_mesh_is_being_removed() {
    let dir = tempfile::tempdir().expect("dir");
    let (conf_dir, bin_dir) = (dir.path().join("net.d"), dir.path().join("bin"));
    std::fs::create_dir_all(&conf_dir).expect("conf dir");
    std::fs::create_dir_all(&bin_dir).expect("bin dir");
    let conf = conf_dir.join("10-flannel.conflist");
    let primary =
        r#"{"cniVersion":"1.0.0","name":"cbr0","plugins":[{"type":"flannel"},{"type":"portmap"}]}"#;
    std::fs::write(&conf, primary).expect("primary conflist");
    let annotations = dir.path().join("annotations");
    std::fs::write(&annotations, "app=\"mesh-agent\"\n").expect("annotations");
    let install = |watch: bool| {
        let mut cmd = Command::new(CNI);
        cmd.arg("install");
        if watch {
            cmd.args(["--watch", "--watch-interval=1"]);
        }
        cmd.arg(format!("--conf-dir={}", conf_dir.display()))
            .arg(format!("--bin-dir={}", bin_dir.display()))
            .arg(format!("--uninstall-signal={}", annotations.display()))
            .stdout(Stdio::null());
        cmd
    };

    let _watcher = Killed(install(true).spawn().expect("run mesh-cni install --watch"));
    wait_for("the first install", || chained(&conf));

    // The pre-delete hook annotates the pod; the kubelet rewrites the file.
    std::fs::write(
        &annotations,
        "app=\"mesh-agent\"\nmesh.io/uninstall=\"true\"\n",
    )
    .expect("annotate");
    wait_for("the plugin taken out", || !chained(&conf));
    wait_for("the binary removed", || !bin_dir.join("mesh-cni").exists());
    let list: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&conf).expect("read")).expect("json");
    assert_eq!(list["plugins"].as_array().map(Vec::len), Some(2));

    // The primary CNI rewriting its conflist does not bring it back, nor does a new install.
    std::fs::write(&conf, primary).expect("rewrite");
    std::thread::sleep(Duration::from_millis(2500));
    assert!(!chained(&conf), "put back during the removal");
    let status = install(false).status().expect("install");
    assert!(status.success());
    assert!(
        !chained(&conf),
        "a new install chained it during the removal"
    );
    assert!(!bin_dir.join("mesh-cni").exists());
}

#[test]
fn help_and_version_answer_and_anything_else_is_a_usage_error() {
    let run = |arg: &str| Command::new(CNI).arg(arg).output().expect("run mesh-cni");
    let help = run("--help");
    assert!(help.status.success());
    assert!(String::from_utf8_lossy(&help.stdout).contains("mesh-cni install"));
    let version = run("--version");
    assert!(version.status.success());
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        format!("mesh-cni {}", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(run("instal").status.code(), Some(64));
}
