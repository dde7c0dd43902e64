//! The files a dynamically linked executable loads at start, as the system's dynamic loader
//! resolves them (`ldd`): its shared libraries and the loader itself. An image holding these
//! next to the executable runs it with no other files.
use std::path::{Path, PathBuf};
use std::process::Command;

/// Why the shared objects of an executable could not be listed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("run ldd on {binary} (Debian package libc-bin)")]
    Run {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("ldd {binary}: {message}")]
    Failed { binary: PathBuf, message: String },
    #[error("ldd {binary}: a library is missing: {line}")]
    Missing { binary: PathBuf, line: String },
}

impl Error {
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Run { .. } => "run",
            Error::Failed { .. } => "failed",
            Error::Missing { .. } => "missing",
        }
    }
}

/// The shared objects `binary` loads, with the dynamic loader, as absolute paths in `ldd`'s
/// order (the vDSO, which has no file, is left out). None for a static executable.
pub fn shared_objects(binary: &Path) -> Result<Vec<PathBuf>, Error> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(|source| Error::Run {
            binary: binary.into(),
            source,
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // A static binary needs nothing more ("not a dynamic executable").
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("not a dynamic executable") || text.contains("statically linked") {
            return Ok(vec![]);
        }
        return Err(Error::Failed {
            binary: binary.into(),
            message: err.trim().to_string(),
        });
    }
    parse(&text).map_err(|line| Error::Missing {
        binary: binary.into(),
        line,
    })
}

/// The absolute paths in `ldd`'s output; the line of a library it could not find as the error.
fn parse(text: &str) -> Result<Vec<PathBuf>, String> {
    let mut files = Vec::new();
    for line in text.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)",
        // "/lib64/ld-linux-x86-64.so.2 (0x...)", "linux-vdso.so.1 (0x...)",
        // "libfoo.so.1 => not found"
        if line.contains("not found") {
            return Err(line.trim().to_string());
        }
        let path = match line.split_once("=>") {
            Some((_, right)) => right.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            files.push(PathBuf::from(p));
        }
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libraries_and_the_loader_are_listed_and_the_vdso_is_not() {
        let text = "\tlinux-vdso.so.1 (0x00007ffc)\n\
                    \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f01)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f02)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f03)\n";
        assert_eq!(
            parse(text).expect("parse"),
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2",
            ]
            .map(PathBuf::from)
        );
        assert_eq!(
            parse("\tlibfoo.so.1 => not found\n"),
            Err("libfoo.so.1 => not found".to_string())
        );
    }

    #[test]
    fn a_system_program_needs_libc_and_the_loader() {
        let files = shared_objects(Path::new("/bin/true")).expect("ldd /bin/true");
        let names: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
        assert!(names.iter().any(|n| n.ends_with("/libc.so.6")), "{names:?}");
        assert!(names.iter().any(|n| n.contains("ld-linux")), "{names:?}");
    }
}
