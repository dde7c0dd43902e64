//! The removal signal: a pod annotation the agent's DaemonSet pods see through a downward API
//! file of their annotations (one `key="value"` line each, the value quoted as Go quotes it).
//! Set by the chart's pre-delete hook when the mesh is uninstalled.

use std::path::Path;

/// The pod annotation that asks for the mesh's removal from the node, with the value `"true"`.
pub const UNINSTALL_ANNOTATION: &str = "mesh.io/uninstall";

/// The value of annotation `key` in a downward API annotations file's `text`.
pub fn annotation(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once('=')?;
        (k.trim() == key).then(|| unquote(v.trim()))
    })
}

/// A Go-quoted string's value (`"a\"b"` is `a"b`); text without quotes as it is.
fn unquote(v: &str) -> String {
    let Some(inner) = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')) else {
        return v.to_string();
    };
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match (c, c == '\\') {
            (_, true) => match chars.next() {
                Some('n') => out.push('\n'),
                Some('t') => out.push('\t'),
                Some(other) => out.push(other),
                None => {}
            },
            (c, false) => out.push(c),
        }
    }
    out
}

/// Whether the annotations file at `path` asks for the mesh's removal. A missing or unreadable
/// file asks nothing.
pub fn uninstall_requested(path: &Path) -> bool {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| annotation(&text, UNINSTALL_ANNOTATION))
        .is_some_and(|v| v == "true")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_annotation_is_read_from_the_downward_api_format() {
        let text = "kubernetes.io/config.seen=\"2026-12-07T12:00:00Z\"\n\
                    mesh.io/uninstall=\"true\"\n\
                    note=\"say \\\"hi\\\"\\nbye\"\n";
        assert_eq!(
            annotation(text, UNINSTALL_ANNOTATION).as_deref(),
            Some("true")
        );
        assert_eq!(annotation(text, "note").as_deref(), Some("say \"hi\"\nbye"));
        assert_eq!(annotation(text, "mesh.io/other"), None);
        assert_eq!(
            annotation("mesh.io/uninstall=\"false\"\n", UNINSTALL_ANNOTATION).as_deref(),
            Some("false")
        );
    }

    #[test]
    fn only_true_in_a_readable_file_asks_for_removal() {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("annotations");
        assert!(!uninstall_requested(&file), "missing file");
        std::fs::write(&file, "mesh.io/uninstall=\"false\"\n").expect("write");
        assert!(!uninstall_requested(&file));
        std::fs::write(&file, "a=\"b\"\nmesh.io/uninstall=\"true\"\n").expect("write");
        assert!(uninstall_requested(&file));
    }
}
