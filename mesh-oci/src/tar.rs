//! A writer of POSIX ustar archives: directories and regular files, each with the owner, mode
//! and time the caller gives (nothing is read from the filesystem), so equal
//! input gives equal bytes.
use std::io::{self, Write};

/// The size of a header and the unit file contents are padded to.
const BLOCK: usize = 512;
/// The longest name a header holds: a 155-byte prefix, a slash, a 100-byte name.
const NAME_MAX: usize = 100;
const PREFIX_MAX: usize = 155;

/// What one archive entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
}

/// The metadata of one entry. `path` is relative (no leading slash); a directory's ends with a
/// slash in the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header<'a> {
    pub path: &'a str,
    pub kind: Kind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: u64,
}

/// Appends entries to `W`; [`Tar::finish`] writes the end-of-archive blocks.
pub struct Tar<W: Write> {
    out: W,
}

impl<W: Write> Tar<W> {
    pub fn new(out: W) -> Tar<W> {
        Tar { out }
    }

    /// Writes one entry: its header, then `data` (`header.size` bytes; none unless a file)
    /// padded to a whole block.
    pub fn append(&mut self, header: &Header<'_>, data: &[u8]) -> io::Result<()> {
        let size = if header.kind == Kind::File {
            header.size
        } else {
            0
        };
        if data.len() as u64 != size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: {} bytes of data for a size of {size}",
                    header.path,
                    data.len()
                ),
            ));
        }
        self.out.write_all(&encode(header)?)?;
        self.out.write_all(data)?;
        self.pad(data.len())
    }

    /// Writes a file's header and then copies its `header.size` bytes from `data`.
    pub fn append_reader(
        &mut self,
        header: &Header<'_>,
        data: &mut impl io::Read,
    ) -> io::Result<()> {
        self.out.write_all(&encode(header)?)?;
        let copied = io::copy(&mut io::Read::take(data, header.size), &mut self.out)?;
        if copied != header.size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{}: {copied} of {} bytes", header.path, header.size),
            ));
        }
        self.pad(copied as usize)
    }

    fn pad(&mut self, len: usize) -> io::Result<()> {
        let rest = (BLOCK - len % BLOCK) % BLOCK;
        self.out.write_all(&[0; BLOCK][..rest])
    }

    /// Ends the archive (two zero blocks) and returns the writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.out.write_all(&[0; 2 * BLOCK])?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// An entry read back from an archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub path: String,
    pub kind: Kind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: u64,
    pub data: Vec<u8>,
}

/// The directories and files of the ustar archive `bytes`, in order; `None` if it is not one
/// (a bad checksum, an entry of another kind, data past the end). Directories lose their
/// trailing slash.
pub fn read(bytes: &[u8]) -> Option<Vec<Entry>> {
    let mut entries = Vec::new();
    let mut at = 0;
    loop {
        let b = bytes.get(at..at + BLOCK)?;
        if b.iter().all(|&x| x == 0) {
            return Some(entries);
        }
        let mut blank = [0u8; BLOCK];
        blank.copy_from_slice(b);
        blank[148..156].fill(b' ');
        let sum: u64 = blank.iter().map(|&x| u64::from(x)).sum();
        if parse_octal(&b[148..156])? != sum || &b[257..263] != b"ustar\0" {
            return None;
        }
        let text = |f: &[u8]| {
            let end = f.iter().position(|&c| c == 0).unwrap_or(f.len());
            String::from_utf8(f[..end].to_vec()).ok()
        };
        let (prefix, name) = (text(&b[345..500])?, text(&b[..100])?);
        let path = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        let kind = match b[156] {
            b'0' | 0 => Kind::File,
            b'5' => Kind::Dir,
            _ => return None,
        };
        let size = usize::try_from(parse_octal(&b[124..136])?).ok()?;
        let data = bytes.get(at + BLOCK..at + BLOCK + size)?.to_vec();
        entries.push(Entry {
            path: path.trim_end_matches('/').to_string(),
            kind,
            mode: u32::try_from(parse_octal(&b[100..108])?).ok()?,
            uid: u32::try_from(parse_octal(&b[108..116])?).ok()?,
            gid: u32::try_from(parse_octal(&b[116..124])?).ok()?,
            mtime: parse_octal(&b[136..148])?,
            data,
        });
        at += BLOCK + size.div_ceil(BLOCK) * BLOCK;
    }
}

fn parse_octal(field: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(field).ok()?;
    let text = text.trim_matches(|c: char| c == '\0' || c == ' ');
    u64::from_str_radix(text, 8).ok()
}

/// The 512-byte ustar header of `h`.
fn encode(h: &Header<'_>) -> io::Result<[u8; BLOCK]> {
    let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidInput, what);
    let mut name = h.path.trim_start_matches('/').to_string();
    if h.kind == Kind::Dir && !name.ends_with('/') {
        name.push('/');
    }
    let (prefix, name) = split_name(&name)
        .ok_or_else(|| invalid(format!("{}: the name is too long for ustar", h.path)))?;
    let mut b = [0u8; BLOCK];
    b[..name.len()].copy_from_slice(name.as_bytes());
    octal(&mut b[100..108], u64::from(h.mode & 0o7777));
    octal(&mut b[108..116], u64::from(h.uid));
    octal(&mut b[116..124], u64::from(h.gid));
    octal(
        &mut b[124..136],
        if h.kind == Kind::File { h.size } else { 0 },
    );
    octal(&mut b[136..148], h.mtime);
    b[156] = match h.kind {
        Kind::File => b'0',
        Kind::Dir => b'5',
    };
    b[257..263].copy_from_slice(b"ustar\0");
    b[263..265].copy_from_slice(b"00");
    octal(&mut b[329..337], 0);
    octal(&mut b[337..345], 0);
    b[345..345 + prefix.len()].copy_from_slice(prefix.as_bytes());
    // The checksum is computed with its own field as spaces.
    b[148..156].fill(b' ');
    let sum: u32 = b.iter().map(|&x| u32::from(x)).sum();
    let field = format!("{sum:06o}\0 ");
    b[148..156].copy_from_slice(field.as_bytes());
    Ok(b)
}

/// Splits `path` into ustar's prefix and name fields, at a slash, when it is too long for the
/// name alone.
fn split_name(path: &str) -> Option<(&str, &str)> {
    if path.len() <= NAME_MAX {
        return Some(("", path));
    }
    // The last slash that leaves a name that fits (a directory's trailing slash stays in it).
    let body = path.strip_suffix('/').unwrap_or(path);
    body.char_indices()
        .filter(|&(i, c)| c == '/' && i <= PREFIX_MAX)
        .map(|(i, _)| (&path[..i], &path[i + 1..]))
        .find(|(_, name)| name.len() <= NAME_MAX && !name.is_empty())
}

/// `value` in octal, zero-padded, NUL-terminated, filling `field`.
fn octal(field: &mut [u8], value: u64) {
    let digits = field.len() - 1;
    let text = format!("{value:0digits$o}");
    // Values are bounded by the callers (sizes of files on disk, 32-bit ids, times).
    let text = &text[text.len().saturating_sub(digits)..];
    field[..digits].copy_from_slice(text.as_bytes());
    field[digits] = 0;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(path: &str, kind: Kind, size: u64) -> Header<'_> {
        Header {
            path,
            kind,
            mode: 0o755,
            uid: 65532,
            gid: 65532,
            size,
            mtime: 0,
        }
    }

    #[test]
    fn a_header_has_ustar_fields_and_a_valid_checksum() {
        let b = encode(&header("usr/local/bin/x", Kind::File, 3)).expect("encode");
        assert_eq!(&b[..16], b"usr/local/bin/x\0");
        assert_eq!(&b[100..108], b"0000755\0");
        assert_eq!(&b[108..116], b"0177774\0");
        assert_eq!(&b[124..136], b"00000000003\0");
        assert_eq!(b[156], b'0');
        assert_eq!(&b[257..265], b"ustar\x0000");
        let stored = std::str::from_utf8(&b[148..154]).expect("ascii");
        let mut blank = b;
        blank[148..156].fill(b' ');
        let sum: u32 = blank.iter().map(|&x| u32::from(x)).sum();
        assert_eq!(u32::from_str_radix(stored, 8).expect("octal"), sum);
    }

    #[test]
    fn directories_end_with_a_slash_and_long_names_use_the_prefix() {
        let b = encode(&header("etc", Kind::Dir, 0)).expect("encode");
        assert_eq!(&b[..4], b"etc/");
        assert_eq!(b[156], b'5');
        let long = format!("{}/{}", "d".repeat(120), "f".repeat(90));
        let b = encode(&header(&long, Kind::File, 0)).expect("encode");
        assert_eq!(&b[345..465], "d".repeat(120).as_bytes());
        assert_eq!(&b[..90], "f".repeat(90).as_bytes());
        assert!(encode(&header(&"x".repeat(300), Kind::File, 0)).is_err());
    }

    #[test]
    fn data_is_padded_to_blocks_and_the_archive_ends_with_two_zero_blocks() {
        let mut tar = Tar::new(Vec::new());
        tar.append(&header("a", Kind::File, 3), b"abc")
            .expect("append");
        tar.append(&header("d", Kind::Dir, 0), &[]).expect("append");
        let bytes = tar.finish().expect("finish");
        assert_eq!(bytes.len(), 512 + 512 + 512 + 1024);
        assert_eq!(&bytes[512..515], b"abc");
        assert!(bytes[515..1024].iter().all(|&x| x == 0));
        assert!(
            Tar::new(Vec::new())
                .append(&header("a", Kind::File, 4), b"abc")
                .is_err()
        );
        let read = read(&bytes).expect("a valid archive");
        assert_eq!(read.len(), 2);
        assert_eq!(
            (read[0].path.as_str(), &read[0].data[..]),
            ("a", &b"abc"[..])
        );
        assert_eq!((read[1].path.as_str(), read[1].kind), ("d", Kind::Dir));
        assert_eq!(
            (read[0].mode, read[0].uid, read[0].mtime),
            (0o755, 65532, 0)
        );
        let mut corrupt = bytes.clone();
        corrupt[0] = b'b';
        assert_eq!(super::read(&corrupt), None);
    }

    #[test]
    fn gnu_tar_reads_what_is_written() {
        let dir = tempfile::tempdir().expect("temp dir");
        let long = format!("{}/{}", "d".repeat(120), "file");
        let mut tar = Tar::new(Vec::new());
        tar.append(&header("d", Kind::Dir, 0), &[]).expect("append");
        tar.append(&header(&long, Kind::File, 5), b"hello")
            .expect("append");
        let path = dir.path().join("a.tar");
        std::fs::write(&path, tar.finish().expect("finish")).expect("write");
        let out = std::process::Command::new("tar")
            .args(["--numeric-owner", "-tvf"])
            .arg(&path)
            .output()
            .expect("run tar");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let list = String::from_utf8_lossy(&out.stdout);
        assert!(list.contains("drwxr-xr-x 65532/65532"), "{list}");
        assert!(
            list.contains(&format!("5 1970-01-01 00:00 {long}")),
            "{list}"
        );
    }
}
