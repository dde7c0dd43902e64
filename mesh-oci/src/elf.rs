//! What an ELF executable asks of the system that runs it: its program interpreter (the
//! dynamic loader, `PT_INTERP`). A file without one is statically linked and runs on any
//! Linux of its architecture, whatever C library the system has.
use std::fs;
use std::path::{Path, PathBuf};

/// Why an executable could not be read as ELF.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a 64-bit little-endian ELF file")]
    NotElf { path: PathBuf },
    #[error("{path}: program headers out of bounds")]
    Truncated { path: PathBuf },
}

impl Error {
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Read { .. } => "read",
            Error::NotElf { .. } => "not_elf",
            Error::Truncated { .. } => "truncated",
        }
    }
}

const PT_INTERP: u32 = 3;
/// The magic number, 64-bit class, little-endian data.
const ELF64_LSB: &[u8] = b"\x7fELF\x02\x01";

/// The program interpreter `path` names, or `None` for a statically linked executable.
pub fn interpreter(path: &Path) -> Result<Option<String>, Error> {
    let bytes = fs::read(path).map_err(|source| Error::Read {
        path: path.into(),
        source,
    })?;
    match interpreter_of(&bytes) {
        Some(interp) => Ok(interp),
        None if bytes.starts_with(ELF64_LSB) => Err(Error::Truncated { path: path.into() }),
        None => Err(Error::NotElf { path: path.into() }),
    }
}

/// `Some(interpreter or None)` for a well-formed ELF64 LSB image, `None` otherwise.
fn interpreter_of(b: &[u8]) -> Option<Option<String>> {
    if !b.starts_with(ELF64_LSB) {
        return None;
    }
    let u16_at = |o: usize| Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?));
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    for i in 0..phnum {
        let ph = phoff.checked_add(i.checked_mul(phentsize)?)?;
        if u32_at(ph)? == PT_INTERP {
            let offset = usize::try_from(u64_at(ph + 8)?).ok()?;
            let size = usize::try_from(u64_at(ph + 32)?).ok()?;
            let name = b.get(offset..offset.checked_add(size)?)?;
            let name = name.split(|&c| c == 0).next().unwrap_or_default();
            return Some(Some(String::from_utf8_lossy(name).into_owned()));
        }
    }
    Some(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dynamic_executable_names_its_loader() {
        let interp = interpreter(Path::new("/bin/true")).expect("read /bin/true");
        let interp = interp.expect("/bin/true is dynamically linked");
        assert!(interp.contains("ld-linux"), "{interp}");
    }

    #[test]
    fn an_executable_without_pt_interp_is_static() {
        // A minimal ELF64 header with one PT_LOAD program header.
        let mut b = vec![0u8; 64 + 56];
        b[..6].copy_from_slice(b"\x7fELF\x02\x01");
        b[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        b[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        b[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        b[64..68].copy_from_slice(&1u32.to_le_bytes());
        assert_eq!(interpreter_of(&b), Some(None));
        // The same header pointing past the end is malformed, not static.
        b[0x38..0x3a].copy_from_slice(&2u16.to_le_bytes());
        assert_eq!(interpreter_of(&b), None);
        assert_eq!(interpreter_of(b"#!/bin/sh\n"), None);
    }
}
