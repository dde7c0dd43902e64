//! The agent's end of the CNI plugin's unix socket (`mesh-agent run --discover-pods`): one
//! JSON request per connection ([`mesh_cni::Request`]), answered with one JSON line once the
//! main loop has decided ([`mesh_cni::Response`]). The socket is the node's root's only: who
//! can write to it can ask for a pod to be enrolled or unenrolled.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use mesh_cni::{Request, Response};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// Longest request line accepted.
const MAX_REQUEST: u64 = 64 * 1024;
/// How long a connected plugin may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A request from the plugin and where its answer goes.
#[derive(Debug)]
pub struct CniCall {
    pub request: Request,
    pub reply: oneshot::Sender<Response>,
}

#[derive(Debug, thiserror::Error)]
pub enum CniSocketError {
    #[error("{path} exists and is not a socket; not replacing it")]
    NotASocket { path: PathBuf },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Listens at `path` (replacing a socket left by an earlier agent) and hands each request to
/// the returned receiver. Abort the task to stop.
pub fn serve(path: &Path) -> Result<(mpsc::Receiver<CniCall>, JoinHandle<()>), CniSocketError> {
    let io = |what, source| CniSocketError::Io {
        what,
        path: path.into(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|e| io("remove the old socket", e))?
        }
        Ok(_) => return Err(CniSocketError::NotASocket { path: path.into() }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("inspect", e)),
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io("create the directory of", e))?;
    }
    let listener = UnixListener::bind(path).map_err(|e| io("listen on", e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| io("restrict", e))?;
    let (tx, rx) = mpsc::channel(64);
    let task = tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(connection(stream, tx.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "CNI socket: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok((rx, task))
}

async fn connection(stream: UnixStream, calls: mpsc::Sender<CniCall>) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read).take(MAX_REQUEST);
    let mut line = String::new();
    let request = match tokio::time::timeout(READ_TIMEOUT, reader.read_line(&mut line)).await {
        Ok(Ok(n)) if n > 0 && line.ends_with('\n') => serde_json::from_str::<Request>(&line)
            .map_err(|e| format!("the request is not valid: {e}")),
        Ok(Ok(_)) => Err("the request is cut short or too long".to_string()),
        Ok(Err(e)) => Err(format!("reading the request: {e}")),
        Err(_) => Err("no request within 10 s".to_string()),
    };
    let answer = match request {
        Err(message) => {
            tracing::warn!(%message, "CNI socket: bad request");
            Response::Failed { message }
        }
        Ok(request) => {
            let who = format!("{}/{}", request.pod.namespace, request.pod.name);
            let op = request.op;
            let (reply, answer) = oneshot::channel();
            if calls.send(CniCall { request, reply }).await.is_err() {
                return;
            }
            // The plugin gives up after its own timeout: stop waiting when it hangs up.
            let mut probe = [0u8; 1];
            let hung_up = async {
                loop {
                    match reader.get_mut().get_mut().read(&mut probe).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
            };
            tokio::select! {
                answer = answer => match answer {
                    Ok(a) => {
                        tracing::info!(pod = %who, ?op, answer = ?a, "CNI call");
                        a
                    }
                    Err(_) => return,
                },
                () = hung_up => {
                    tracing::warn!(pod = %who, ?op, "CNI plugin hung up before the answer");
                    return;
                }
            }
        }
    };
    let mut out = serde_json::to_vec(&answer).unwrap_or_default();
    out.push(b'\n');
    let _ = write.write_all(&out).await;
}
