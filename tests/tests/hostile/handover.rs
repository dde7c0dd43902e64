//! Attacks on the hand-over socket, through which a running agent gives its successor every
//! pod's listening sockets (whoever holds them receives the pods' traffic): another user of
//! the node asks for them.
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt as _;
use std::process::Command;

use mesh_tests::{installed, privileged};

use crate::common::{ECHO_VIP, up, wait_until_ok};

const PYTHON: &str = "/usr/bin/python3";

/// Connects to the hand-over socket at argv[1] as a successor would and says what it got:
/// `denied` (no connection), or `got <bytes> bytes <n> fds`.
const ASK_FOR_THE_SOCKETS: &str = r#"
import array, json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
try:
    s.connect(sys.argv[1])
except PermissionError:
    print("denied")
    sys.exit(0)
s.settimeout(10)
try:
    # The agent may close before the hello is even sent (EPIPE) or after (reset, EOF).
    s.sendall(json.dumps({"kind": "hello", "protocol": 1, "version": "9.9.9"}).encode())
    msg, anc, _, _ = s.recvmsg(65536, socket.CMSG_SPACE(16 * array.array("i").itemsize))
except (BrokenPipeError, ConnectionResetError, TimeoutError):
    msg, anc = b"", []
fds = sum(len(d) // 4 for (level, kind, d) in anc
          if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS)
print(f"got {len(msg)} bytes {fds} fds")
"#;

fn ask_as_nobody(socket: &std::path::Path) -> String {
    let out = Command::new(PYTHON)
        .args(["-c", ASK_FOR_THE_SOCKETS])
        .arg(socket)
        .uid(65534)
        .gid(65534)
        .output()
        .expect("run python3 as nobody");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn another_user_of_the_node_cannot_take_the_pods_sockets_over() {
    let test = "another_user_of_the_node_cannot_take_the_pods_sockets_over";
    if !privileged(test) || !installed(test, &[(PYTHON, &["-c", "import socket"], "python3")]) {
        return;
    }
    let c = up(&[]);
    wait_until_ok(&c, "demo/client", ECHO_VIP);
    let socket = c.state.join("handover/node-1.sock");
    assert!(socket.exists(), "node-1's agent serves no hand-over socket");

    // The directory is the agent's alone.
    assert_eq!(ask_as_nobody(&socket), "denied");

    // Even where someone opened it up, the agent hands nothing to another user.
    let dir = socket.parent().expect("directory");
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod dir");
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o777))
        .expect("chmod socket");
    assert_eq!(ask_as_nobody(&socket), "got 0 bytes 0 fds");
    // The refusal reaches the agent's main loop, and its log, a moment later.
    let log = c.state.join("logs/agent-node-1.log");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("not as this agent's uid")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the agent did not say why it refused"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }

    // And it serves on as before.
    assert_eq!(
        wait_until_ok(&c, "demo/client", ECHO_VIP).trim(),
        "echo hello"
    );
    c.down().expect("teardown");
}
