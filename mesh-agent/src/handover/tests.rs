//! The exchange between two agents, on a unix socket in a temporary directory, with loopback
//! listeners standing for a pod's.
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;

use super::*;

fn loopback() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").expect("bind")
}

fn dup(l: &TcpListener) -> OwnedFd {
    l.as_fd().try_clone_to_owned().expect("dup")
}

/// Serves successors at `path` on a runtime of its own, answering every `Asked` with
/// `offer()`, and reports the events.
fn answer(
    path: &Path,
    offer: impl Fn() -> Offer + Send + 'static,
) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    let (served_tx, served) = std::sync::mpsc::channel();
    let path = path.to_path_buf();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let mut events = match serve(&path) {
                Ok(h) => {
                    let _ = served_tx.send(Ok(()));
                    h
                }
                Err(e) => {
                    let _ = served_tx.send(Err(e.to_string()));
                    return;
                }
            };
            while let Some(event) = events.next().await {
                let seen = match event {
                    Event::Asked(reply) => {
                        let _ = reply.send(offer());
                        "asked".to_string()
                    }
                    Event::Taken => "taken".to_string(),
                    Event::GaveUp(e) => format!("gave up: {e}"),
                };
                if tx.send(seen).is_err() {
                    return;
                }
            }
        });
    });
    served
        .recv_timeout(Duration::from_secs(10))
        .expect("serving")
        .expect("serve");
    rx
}

fn next(rx: &std::sync::mpsc::Receiver<String>) -> String {
    rx.recv_timeout(Duration::from_secs(10)).expect("an event")
}

#[test]
fn a_successor_gets_the_same_listening_sockets_and_says_when_it_took_over() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("run/handover.sock");
    let (outbound, inbound, hbone, admin) = (loopback(), loopback(), loopback(), loopback());
    let addrs: Vec<_> = [&outbound, &inbound, &hbone, &admin]
        .iter()
        .map(|l| l.local_addr().expect("addr"))
        .collect();
    let offer = {
        let fds = [&outbound, &inbound, &hbone, &admin].map(dup);
        move || Offer {
            pods: vec![
                (
                    "shop/api-0".into(),
                    Listening {
                        outbound: fds[0].try_clone().expect("dup"),
                        inbound: fds[1].try_clone().expect("dup"),
                        hbone: Some(fds[2].try_clone().expect("dup")),
                    },
                ),
                (
                    "shop/db-0".into(),
                    Listening {
                        outbound: fds[0].try_clone().expect("dup"),
                        inbound: fds[1].try_clone().expect("dup"),
                        hbone: None,
                    },
                ),
            ],
            endpoints: vec![fds[3].try_clone().expect("dup")],
        }
    };
    let events = answer(&path, offer);
    let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&path), 0o600, "only root may use the socket");
    assert_eq!(mode(path.parent().expect("dir")), 0o700);

    let inherited = take_over(&path)
        .expect("take over")
        .expect("an agent serves");
    assert_eq!(next(&events), "asked");
    assert_eq!(inherited.from, env!("CARGO_PKG_VERSION"));
    let api = &inherited.pods["shop/api-0"];
    let got = |l: &TcpListener| l.local_addr().expect("addr");
    assert_eq!(got(&api.outbound), addrs[0]);
    assert_eq!(got(&api.inbound), addrs[1]);
    assert_eq!(api.hbone.as_ref().map(got), Some(addrs[2]));
    assert!(inherited.pods["shop/db-0"].hbone.is_none());
    assert_eq!(
        inherited.endpoints.iter().map(got).collect::<Vec<_>>(),
        [addrs[3]]
    );

    // The very sockets: a connection queued on the old one is accepted from the new one.
    drop((outbound, hbone, admin));
    let mut client = TcpStream::connect(addrs[1]).expect("connect");
    client.write_all(b"hi").expect("write");
    let (mut served, _) = api
        .inbound
        .accept()
        .expect("accept on the inherited socket");
    let mut buf = [0u8; 2];
    served.read_exact(&mut buf).expect("read");
    assert_eq!(&buf, b"hi");
    drop(inbound);

    inherited.taken().expect("taken");
    assert_eq!(next(&events), "taken");
}

#[test]
fn with_no_agent_serving_there_is_nothing_to_take_over() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("handover.sock");
    assert!(take_over(&path).expect("no socket").is_none());
    // A crashed agent's socket: the file stays, nobody listens.
    let stale = seqpacket().expect("socket");
    socket::bind(stale.as_raw_fd(), &UnixAddr::new(&path).expect("address")).expect("bind");
    drop(stale);
    assert!(path.exists());
    assert!(take_over(&path).expect("stale socket").is_none());
    // And the next agent serves in its place.
    let _events = answer(&path, Offer::default);
}

#[test]
fn a_successor_that_goes_away_before_taking_over_leaves_the_agent_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("handover.sock");
    let events = answer(&path, Offer::default);
    let inherited = take_over(&path).expect("take over").expect("served");
    assert!(inherited.pods.is_empty());
    assert_eq!(next(&events), "asked");
    drop(inherited);
    assert!(next(&events).starts_with("gave up"), "the agent is told");
    // A later successor is served again.
    let again = take_over(&path).expect("take over").expect("served");
    assert_eq!(next(&events), "asked");
    again.taken().expect("taken");
    assert_eq!(next(&events), "taken");
}

/// A fake running agent at `path` that answers the hello with `reply` and its descriptors.
fn fake_agent(path: &Path, reply: Message, fds: Vec<OwnedFd>) -> std::thread::JoinHandle<()> {
    let listener = seqpacket().expect("socket");
    socket::bind(listener.as_raw_fd(), &UnixAddr::new(path).expect("address")).expect("bind");
    socket::listen(&listener, Backlog::new(1).expect("backlog")).expect("listen");
    std::thread::spawn(move || {
        // SAFETY: a new descriptor from accept.
        let conn =
            unsafe { OwnedFd::from_raw_fd(socket::accept(listener.as_raw_fd()).expect("accept")) };
        let _ = recv(&conn);
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        send(&conn, &reply, &raw).expect("send");
        // Hold the connection until the successor is done with it.
        let _ = recv(&conn);
    })
}

#[test]
fn a_broken_or_foreign_exchange_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let l = loopback();
    let cases = [
        (
            Message::Pod {
                name: "shop/api-0".into(),
                hbone: true,
            },
            vec![dup(&l), dup(&l)],
            "came with 2 descriptors",
        ),
        (
            Message::Pod {
                name: "api-0".into(),
                hbone: false,
            },
            vec![dup(&l), dup(&l)],
            "not namespace/name",
        ),
        (
            Message::Hello {
                protocol: PROTOCOL + 1,
                version: "9.9.9".into(),
            },
            vec![],
            "protocol",
        ),
        (Message::Taken, vec![], "unexpected"),
    ];
    for (i, (reply, fds, want)) in cases.into_iter().enumerate() {
        let path = dir.path().join(format!("fake-{i}.sock"));
        let agent = fake_agent(&path, reply, fds);
        let err = take_over(&path).err().expect("refused").to_string();
        assert!(err.contains(want), "case {i}: {err}");
        agent.join().expect("fake agent");
    }
}

#[tokio::test]
async fn a_stopped_agent_removes_its_socket_and_never_its_successors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("handover.sock");
    drop(serve(&path).expect("serve"));
    assert!(!path.exists(), "left behind");
    let old = serve(&path).expect("serve");
    let new = serve(&path).expect("the successor serves in its place");
    drop(old);
    assert!(path.exists(), "the successor's socket was removed");
    drop(new);
    assert!(!path.exists());
}
