//! Blocking socket helpers shared by the benchmark's client and servers: reads that ride out
//! the spurious `EAGAIN` of a socket in a sockmap, and just enough HTTP/1.1 to send and answer
//! `POST` requests with a body (`Content-Length` or chunked, as a proxy may re-frame them).
use std::io::{self, BufRead, Read, Write};
use std::net::TcpStream;

/// A reader that retries `WouldBlock`: a blocking `recv()` on a socket in a sockmap can return
/// `EAGAIN` when the psock queue is momentarily empty (see KERNEL-NOTES.md).
pub struct Retry<'a>(pub &'a TcpStream);

impl Read for Retry<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match (&*self.0).read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return other,
            }
        }
    }
}

/// Reads exactly `buf.len()` bytes.
pub fn read_exact(s: &TcpStream, buf: &mut [u8]) -> io::Result<()> {
    Retry(s).read_exact(buf)
}

/// How an HTTP/1.1 message's body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Length(u64),
    Chunked,
}

/// A message head: its start line and body framing.
#[derive(Debug)]
pub struct Head {
    pub start: String,
    pub framing: Framing,
}

/// Reads a message head; `None` on a clean end of stream before its first byte.
pub fn read_head(r: &mut impl BufRead) -> io::Result<Option<Head>> {
    let mut start = String::new();
    if r.read_line(&mut start)? == 0 {
        return Ok(None);
    }
    let mut framing = Framing::Length(0);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let n = value
                .parse()
                .map_err(|_| io::Error::other(format!("bad content-length {value:?}")))?;
            framing = Framing::Length(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            && value.to_ascii_lowercase().contains("chunked")
        {
            framing = Framing::Chunked;
        }
    }
    Ok(Some(Head {
        start: start.trim_end().to_string(),
        framing,
    }))
}

/// Reads and discards a body; returns its length.
pub fn skip_body(r: &mut impl BufRead, framing: Framing) -> io::Result<u64> {
    match framing {
        Framing::Length(n) => skip(r, n).map(|()| n),
        Framing::Chunked => {
            let mut total = 0;
            loop {
                let mut line = String::new();
                r.read_line(&mut line)?;
                let size = line.trim().split(';').next().unwrap_or_default();
                let n = u64::from_str_radix(size, 16)
                    .map_err(|_| io::Error::other(format!("bad chunk size {line:?}")))?;
                if n == 0 {
                    // Trailers, if any, end with an empty line.
                    loop {
                        line.clear();
                        if r.read_line(&mut line)? == 0 || line.trim().is_empty() {
                            return Ok(total);
                        }
                    }
                }
                skip(r, n + 2)?;
                total += n;
            }
        }
    }
}

fn skip(r: &mut impl BufRead, mut n: u64) -> io::Result<()> {
    while n > 0 {
        let buf = r.fill_buf()?;
        if buf.is_empty() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let take = buf.len().min(usize::try_from(n).unwrap_or(usize::MAX));
        r.consume(take);
        n -= take as u64;
    }
    Ok(())
}

/// A `POST` head for a body of `len` bytes.
pub fn request_head(path: &str, len: u64) -> Vec<u8> {
    format!("POST {path} HTTP/1.1\r\nHost: server\r\nContent-Length: {len}\r\n\r\n").into_bytes()
}

/// A `200 OK` with a body of `len` bytes (`x`), written in one go.
pub fn respond(w: &mut impl Write, len: u64) -> io::Result<()> {
    let mut out = format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n\r\n").into_bytes();
    out.resize(out.len() + usize::try_from(len).unwrap_or(0), b'x');
    w.write_all(&out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_length_and_chunked_bodies() {
        let raw = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabcPOST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nwxyz\r\n2;x=1\r\nab\r\n0\r\n\r\n";
        let mut r = io::BufReader::new(&raw[..]);
        let h = read_head(&mut r).expect("head").expect("a message");
        assert_eq!(h.start, "HTTP/1.1 200 OK");
        assert_eq!(skip_body(&mut r, h.framing).expect("body"), 3);
        let h = read_head(&mut r).expect("head").expect("a message");
        assert_eq!(h.framing, Framing::Chunked);
        assert_eq!(skip_body(&mut r, h.framing).expect("body"), 6);
        assert!(read_head(&mut r).expect("end").is_none());
    }

    #[test]
    fn a_response_carries_the_asked_length() {
        let mut out = Vec::new();
        respond(&mut out, 5).expect("write");
        assert!(out.ends_with(b"Content-Length: 5\r\n\r\nxxxxx"));
    }
}
