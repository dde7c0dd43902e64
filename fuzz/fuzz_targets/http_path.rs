//! HTTP request paths as a request line or an HTTP/2 `:path` carries them, normalized before
//! any policy match (`mesh_core::http_path`).
//!
//! Invariants: normalizing never panics; with the default settings an accepted path
//! normalizes to itself again, keeps no dot segment, no `//` and no encoded `/` or `\`; with
//! any settings UTF-8 input gives UTF-8 output, and a refusal has a kind.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_core::http_path::{EscapedSlashes, PathNormalization, normalize_bytes};

fuzz_target!(|data: &[u8]| {
    // The leading byte chooses the settings; the rest is the path.
    let Some((&mode, path)) = data.split_first() else {
        return;
    };
    let settings = PathNormalization {
        normalize_path: mode & 1 == 0,
        merge_slashes: mode & 2 == 0,
        escaped_slashes: match (mode >> 2) % 3 {
            0 => EscapedSlashes::Reject,
            1 => EscapedSlashes::Keep,
            _ => EscapedSlashes::Unescape,
        },
    };
    match normalize_bytes(path, &settings) {
        Ok(out) => {
            assert!(
                std::str::from_utf8(path).is_err() || std::str::from_utf8(&out).is_ok(),
                "UTF-8 input gave non-UTF-8 output: {path:?} -> {out:?}"
            );
            if settings == PathNormalization::default() && out.as_ref() != b"*" {
                check_canonical(path, &out, &settings);
            }
        }
        Err(e) => assert!(!e.kind().is_empty()),
    }
});

fn check_canonical(path: &[u8], out: &[u8], settings: &PathNormalization) {
    let again = normalize_bytes(out, settings).unwrap_or_else(|e| {
        panic!("{out:?} (from {path:?}) is refused when normalized again: {e}")
    });
    assert_eq!(again.as_ref(), out, "not idempotent for {path:?}");
    let segments: Vec<&[u8]> = out.split(|b| *b == b'/').skip(1).collect();
    assert!(
        !segments.iter().any(|s| *s == b"." || *s == b".."),
        "dot segment left in {out:?} (from {path:?})"
    );
    assert!(
        !out.windows(2).any(|w| w == b"//"),
        "'//' left in {out:?} (from {path:?})"
    );
    let upper = out.to_ascii_uppercase();
    assert!(
        !upper.windows(3).any(|w| w == b"%2F" || w == b"%5C"),
        "encoded slash left in {out:?} (from {path:?})"
    );
}
