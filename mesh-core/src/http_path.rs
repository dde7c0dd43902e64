//! HTTP request paths as policy and routing match them: one canonical form per resource.
//!
//! A path allow-list (`GET /public/.*`) means nothing if `/public/../admin/` or
//! `/public/%2e%2e/admin/` passes it and the application then resolves the path to
//! `/admin/`. [`normalize`] turns a request path into the form the policy, the router and,
//! since the proxy forwards it, the application all see:
//!
//! 1. Percent-encodings are checked and made canonical (RFC 3986 section 6.2.2): encoded
//!    unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded, the hex digits of every
//!    other encoding are upper-cased. A `%` not followed by two hex digits, and an encoded
//!    NUL (`%00`), are refused. Encoded `/` (`%2F`) and `\` (`%5C`) follow
//!    [`EscapedSlashes`] (refused by default: an application may decode them into path
//!    separators after the policy looked at one segment).
//! 2. With `merge_slashes`, runs of `/` become one (`/a//b` is `/a/b`, as most servers read
//!    it).
//! 3. Dot segments are removed (RFC 3986 section 5.2.4): `/a/./b` is `/a/b`, `/a/b/../c` is
//!    `/a/c`, a `..` above the root stays at the root.
//!
//! The query is not part of the path and is never touched: callers pass the path alone. The
//! asterisk-form `*` (for `OPTIONS *`) is returned as it is; any other path that does not
//! start with `/` is refused. Normalizing is idempotent, and never panics on any input (it
//! works on bytes; [`normalize_bytes`] takes raw bytes).

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

/// What to do with a percent-encoded `/` (`%2F`) or `\` (`%5C`) in a path, after Envoy's
/// `path_with_escaped_slashes_action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EscapedSlashes {
    /// Refuse the request (400).
    #[default]
    Reject,
    /// Leave them encoded (hex upper-cased): they are not separators for the policy, and an
    /// application that decodes them may see another path than the policy did.
    Keep,
    /// Decode them before the other steps: `%2F` is a `/` (a separator) and `%5C` a `\`, and
    /// the decoded path is what the policy matches and the application receives.
    Unescape,
}

/// The normalization settings (Envoy's `normalize_path`, `merge_slashes` and
/// `path_with_escaped_slashes_action`). The default is the safe one: every step on, escaped
/// slashes refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PathNormalization {
    /// Canonical percent-encodings and dot-segment removal (steps 1 and 3). Off, the path is
    /// only checked (invalid encodings, NUL, escaped slashes) and otherwise left as sent.
    pub normalize_path: bool,
    /// Merge runs of `/` (step 2).
    pub merge_slashes: bool,
    pub escaped_slashes: EscapedSlashes,
}

impl Default for PathNormalization {
    fn default() -> Self {
        PathNormalization {
            normalize_path: true,
            merge_slashes: true,
            escaped_slashes: EscapedSlashes::Reject,
        }
    }
}

/// Why a path cannot be normalized safely (the proxy answers 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path is empty")]
    Empty,
    #[error("the path does not start with '/'")]
    NotAbsolute,
    #[error("invalid percent-encoding at byte {at}")]
    InvalidEncoding { at: usize },
    #[error("encoded NUL (%00) at byte {at}")]
    EncodedNul { at: usize },
    #[error("encoded '/' or '\\' ({escape}) at byte {at}")]
    EscapedSlash { at: usize, escape: &'static str },
    #[error("the path is not UTF-8")]
    NotUtf8,
}

impl PathError {
    /// A short stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            PathError::Empty => "path_empty",
            PathError::NotAbsolute => "path_not_absolute",
            PathError::InvalidEncoding { .. } => "path_invalid_encoding",
            PathError::EncodedNul { .. } => "path_encoded_nul",
            PathError::EscapedSlash { .. } => "path_escaped_slash",
            PathError::NotUtf8 => "path_not_utf8",
        }
    }
}

/// The path in its normalized form (see the module documentation), borrowed when it already
/// was.
pub fn normalize<'a>(
    path: &'a str,
    settings: &PathNormalization,
) -> Result<Cow<'a, str>, PathError> {
    match normalize_bytes(path.as_bytes(), settings)? {
        Cow::Borrowed(_) => Ok(Cow::Borrowed(path)),
        Cow::Owned(bytes) => String::from_utf8(bytes)
            .map(Cow::Owned)
            .map_err(|_| PathError::NotUtf8),
    }
}

/// [`normalize`] on raw bytes (an HTTP/2 `:path` or a request line as received). Bytes above
/// 0x7F pass through unchanged; the result of UTF-8 input is UTF-8 (segments are split on `/`
/// only, so no character is cut). The converse does not hold: a dot segment may remove the
/// only invalid bytes, as in `/a/\xFF/../b`.
pub fn normalize_bytes<'a>(
    path: &'a [u8],
    settings: &PathNormalization,
) -> Result<Cow<'a, [u8]>, PathError> {
    match path {
        [] => return Err(PathError::Empty),
        b"*" => return Ok(Cow::Borrowed(path)),
        [b'/', ..] => {}
        _ => return Err(PathError::NotAbsolute),
    }
    if already_normal(path, settings) {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode(path, settings)?;
    let merged = if settings.merge_slashes {
        merge_slashes(&decoded)
    } else {
        decoded
    };
    let normal = if settings.normalize_path {
        remove_dot_segments(&merged)
    } else {
        merged
    };
    if normal.as_slice() == path {
        Ok(Cow::Borrowed(path))
    } else {
        Ok(Cow::Owned(normal))
    }
}

/// Whether `path` (starting with `/`) is unchanged by every step: no `%` at all, no `//`
/// when slashes are merged, no `.` or `..` segment when normalizing. The common case, answered
/// without allocating.
fn already_normal(path: &[u8], settings: &PathNormalization) -> bool {
    if path.contains(&b'%') {
        return false;
    }
    if settings.merge_slashes && path.windows(2).any(|w| w == b"//") {
        return false;
    }
    !settings.normalize_path
        || path[1..]
            .split(|&b| b == b'/')
            .all(|segment| segment != b"." && segment != b"..")
}

/// Characters RFC 3986 calls unreserved: never different encoded or not.
fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Step 1: checks every `%XX`; with `normalize_path` also makes each canonical.
fn decode(path: &[u8], settings: &PathNormalization) -> Result<Vec<u8>, PathError> {
    let mut out = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < path.len() {
        let b = path[i];
        if b != b'%' {
            out.push(b);
            i += 1;
            continue;
        }
        let (Some(hi), Some(lo)) = (
            path.get(i + 1).copied().and_then(hex),
            path.get(i + 2).copied().and_then(hex),
        ) else {
            return Err(PathError::InvalidEncoding { at: i });
        };
        let value = hi << 4 | lo;
        match value {
            0 => return Err(PathError::EncodedNul { at: i }),
            b'/' | b'\\' => match settings.escaped_slashes {
                EscapedSlashes::Reject => {
                    return Err(PathError::EscapedSlash {
                        at: i,
                        escape: if value == b'/' { "%2F" } else { "%5C" },
                    });
                }
                EscapedSlashes::Unescape => out.push(value),
                EscapedSlashes::Keep if settings.normalize_path => push_encoded(&mut out, value),
                EscapedSlashes::Keep => out.extend_from_slice(&path[i..i + 3]),
            },
            v if settings.normalize_path && unreserved(v) => out.push(v),
            v if settings.normalize_path => push_encoded(&mut out, v),
            _ => out.extend_from_slice(&path[i..i + 3]),
        }
        i += 3;
    }
    Ok(out)
}

fn push_encoded(out: &mut Vec<u8>, value: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.extend_from_slice(&[
        b'%',
        HEX[usize::from(value >> 4)],
        HEX[usize::from(value & 15)],
    ]);
}

/// Step 2.
fn merge_slashes(path: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(path.len());
    for &b in path {
        if b == b'/' && out.last() == Some(&b'/') {
            continue;
        }
        out.push(b);
    }
    out
}

/// Step 3: RFC 3986 section 5.2.4 on an absolute path, segment by segment. Every output
/// segment is preceded by `/`; `.` segments disappear, `..` removes the segment before it
/// (none above the root); a path ending in `.` or `..` keeps its trailing `/`.
fn remove_dot_segments(path: &[u8]) -> Vec<u8> {
    // `path` starts with '/': the segments are what follows each '/'.
    let segments = path[1..].split(|&b| b == b'/');
    let count = segments.clone().count();
    let mut out: Vec<&[u8]> = Vec::with_capacity(count);
    let mut trailing = false;
    for (n, segment) in segments.enumerate() {
        let last = n + 1 == count;
        match segment {
            b"." => trailing = last,
            b".." => {
                out.pop();
                trailing = last;
            }
            s => {
                out.push(s);
                trailing = false;
            }
        }
    }
    let mut normal = Vec::with_capacity(path.len());
    for s in &out {
        normal.push(b'/');
        normal.extend_from_slice(s);
    }
    if trailing || normal.is_empty() {
        normal.push(b'/');
    }
    normal
}

#[cfg(test)]
mod tests;
