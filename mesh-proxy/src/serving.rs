//! Where the proxy serves the connections it accepts.
//!
//! [`Serving::shared`] spawns each connection's task on the runtime of the loop that accepted
//! it: the agent's work-stealing runtime, whose threads take tasks from each other. Every
//! wake-up of a connection's task (a byte arrived, the other side's task wrote) may then land
//! on another thread, which is woken with a futex and a context switch; a round trip through
//! the proxy wakes several tasks, so on a small node that costs more than the proxying.
//!
//! [`Serving::pinned`] starts threads of their own, each running a single-thread runtime,
//! and serves each accepted connection on one of them, in turn. Everything the connection
//! starts (its copy, its HTTP codecs, the tunnel it opens, the connection to the application)
//! runs on that thread: the tasks of one connection wake each other without crossing
//! threads. Connections spread over the threads, so the proxy still uses every core it is
//! given. Each thread keeps HBONE connections of its own to the other nodes (the pool's key
//! has the thread, [`current`]), driven on it; what connections share besides (the
//! configuration, the certificates, kept L7 connections) is reached across threads.

use std::cell::Cell;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tracing::debug;

/// Where accepted connections are served (see the module's documentation). Cheap to clone.
#[derive(Clone, Default)]
pub struct Serving {
    pinned: Option<Arc<Threads>>,
}

impl std::fmt::Debug for Serving {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.pinned {
            None => f.write_str("Serving::shared"),
            Some(t) => write!(f, "Serving::pinned({})", t.handles.len()),
        }
    }
}

/// Threads each running a single-thread runtime; they stop when the last [`Serving`]
/// holding them is dropped, and the connections still served on them are closed.
struct Threads {
    handles: Vec<Handle>,
    next: AtomicUsize,
    /// Dropped with the threads: each runtime's `block_on` returns and the runtime drops its
    /// tasks.
    _stop: Vec<oneshot::Sender<()>>,
}

thread_local! {
    /// The index of the proxy thread this is, on one.
    static THREAD: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Which of the proxy's threads the caller runs on; `None` off them (the agent's runtime).
pub fn current() -> Option<usize> {
    THREAD.with(Cell::get)
}

/// The proxy's threads when nothing says: one per CPU this process may run on (its
/// affinity and its cgroup's CPU quota counted), at least one.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

impl Serving {
    /// On the runtime of the accepting loop.
    pub fn shared() -> Serving {
        Serving::default()
    }

    /// On `threads` threads of their own (at least one), each connection on one of them.
    pub fn pinned(threads: usize) -> std::io::Result<Serving> {
        let mut handles = Vec::with_capacity(threads.max(1));
        let mut stop = Vec::with_capacity(threads.max(1));
        for i in 0..threads.max(1) {
            let (handle_tx, handle_rx) = std::sync::mpsc::channel();
            let (stop_tx, stop_rx) = oneshot::channel::<()>();
            std::thread::Builder::new()
                .name(format!("mesh-proxy-{i}"))
                .spawn(move || {
                    THREAD.with(|t| t.set(Some(i)));
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            let _ = handle_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = handle_tx.send(Ok(rt.handle().clone()));
                    // Until every sender is gone; then the runtime drops its tasks.
                    let _ = rt.block_on(stop_rx);
                })?;
            let handle = handle_rx
                .recv()
                .map_err(|_| std::io::Error::other("a proxy thread ended before it started"))??;
            handles.push(handle);
            stop.push(stop_tx);
        }
        Ok(Serving {
            pinned: Some(Arc::new(Threads {
                handles,
                next: AtomicUsize::new(0),
                _stop: stop,
            })),
        })
    }

    /// How many threads of their own serve connections (0: the accepting runtime's).
    pub fn threads(&self) -> usize {
        self.pinned.as_ref().map_or(0, |t| t.handles.len())
    }

    /// Serves `conn` with `serve` on its own task, where this says.
    pub fn spawn<F, Fut>(&self, conn: TcpStream, serve: F)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Some(threads) = &self.pinned else {
            tokio::spawn(serve(conn));
            return;
        };
        let i = threads.next.fetch_add(1, Ordering::Relaxed) % threads.handles.len();
        // The socket moves to the chosen thread's reactor: out of this one, into that one.
        let conn = match conn.into_std() {
            Ok(c) => c,
            Err(e) => {
                debug!(error = %e, "accepted connection lost moving to a proxy thread");
                return;
            }
        };
        threads.handles[i].spawn(async move {
            match TcpStream::from_std(conn) {
                Ok(conn) => serve(conn).await,
                Err(e) => debug!(error = %e, "accepted connection lost moving to a proxy thread"),
            }
        });
    }
}

#[cfg(test)]
mod tests;
