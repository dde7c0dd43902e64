//! Micro-benchmark of the copy under every proxied connection: [`copy_both`] between two
//! in-memory duplex pipes, one standing for the application's socket and one for the
//! upstream, so the figure is the copy loop's own cost (buffer growth, polling, half-close)
//! without the kernel's. Run with `cargo bench -p mesh-proxy --bench hot`.

use std::hint::black_box;
use std::io;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use mesh_proxy::copy::{MAX_BUF, copy_both};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::runtime::Runtime;

/// Bytes sent each way per connection.
const PAYLOAD: usize = 1 << 20;

/// Capacity of each in-memory pipe: as much as the copy moves per read at most, roughly what
/// a loopback socket buffer holds.
const PIPE: usize = MAX_BUF;

/// One end of a connection: sends `send`, half-closes, and reads until the other side
/// half-closed. Returns the bytes read.
async fn peer(io: DuplexStream, send: &[u8], sink: &mut [u8]) -> io::Result<usize> {
    let (mut r, mut w) = tokio::io::split(io);
    let write = async {
        w.write_all(send).await?;
        w.shutdown().await
    };
    let read = async {
        let mut total = 0;
        loop {
            match r.read(sink).await? {
                0 => return Ok(total),
                n => total += n,
            }
        }
    };
    let (written, read) = tokio::join!(write, read);
    written?;
    read
}

/// One proxied connection: the application sends `up`, the server answers `down`, the copy
/// carries both between them. Returns what the copy counted each way.
async fn connection(up: &[u8], down: &[u8], sinks: &mut [Vec<u8>; 2]) -> (u64, u64) {
    let (app, mut app_side) = tokio::io::duplex(PIPE);
    let (mut upstream_side, server) = tokio::io::duplex(PIPE);
    let [app_sink, server_sink] = sinks;
    let (copied, app_read, server_read) = tokio::join!(
        copy_both(&mut app_side, &mut upstream_side),
        peer(app, up, app_sink),
        peer(server, down, server_sink),
    );
    let copied = copied.expect("copy");
    assert_eq!(app_read.expect("application side"), down.len());
    assert_eq!(server_read.expect("server side"), up.len());
    copied
}

fn bench_copy(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("tokio runtime");
    let payload = vec![0x5a_u8; PAYLOAD];
    let mut sinks = [vec![0u8; PIPE], vec![0u8; PIPE]];
    let mut run = |rt: &Runtime, up: &[u8], down: &[u8]| {
        rt.block_on(connection(black_box(up), black_box(down), &mut sinks))
    };
    assert_eq!(run(&rt, &payload, &[]), (PAYLOAD as u64, 0));

    let mut group = c.benchmark_group("copy_both");
    group.throughput(Throughput::Bytes(PAYLOAD as u64));
    group.bench_function("one_way_1MiB", |b| b.iter(|| run(&rt, &payload, &[])));
    group.throughput(Throughput::Bytes(2 * PAYLOAD as u64));
    group.bench_function("both_ways_1MiB", |b| {
        b.iter(|| run(&rt, &payload, &payload))
    });
    group.finish();
}

/// Short runs: a regression check to run before and after a change.
fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30)
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_copy
}
criterion_main!(benches);
