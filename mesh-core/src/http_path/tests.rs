use super::*;

fn norm(path: &str) -> Result<String, PathError> {
    normalize(path, &PathNormalization::default()).map(Cow::into_owned)
}

fn with(path: &str, settings: PathNormalization) -> Result<String, PathError> {
    normalize(path, &settings).map(Cow::into_owned)
}

/// RFC 3986 section 5.4 (base `http://a/b/c/d;p?q`), the examples whose result is decided by
/// the path: the reference merged with the base path as section 5.2.3 does, then
/// normalized; and section 5.2.4's own example.
#[test]
fn rfc3986_reference_resolution_examples_that_are_about_paths() {
    let cases = [
        // 5.4.1 normal examples
        ("/b/c/g", "/b/c/g"),
        ("/b/c/./g", "/b/c/g"),
        ("/b/c/g/", "/b/c/g/"),
        ("/g", "/g"),
        ("/b/c/g;x", "/b/c/g;x"),
        ("/b/c/.", "/b/c/"),
        ("/b/c/./", "/b/c/"),
        ("/b/c/..", "/b/"),
        ("/b/c/../", "/b/"),
        ("/b/c/../g", "/b/g"),
        ("/b/c/../..", "/"),
        ("/b/c/../../", "/"),
        ("/b/c/../../g", "/g"),
        // 5.4.2 abnormal examples
        ("/b/c/../../../g", "/g"),
        ("/b/c/../../../../g", "/g"),
        ("/./g", "/g"),
        ("/../g", "/g"),
        ("/b/c/g.", "/b/c/g."),
        ("/b/c/.g", "/b/c/.g"),
        ("/b/c/g..", "/b/c/g.."),
        ("/b/c/..g", "/b/c/..g"),
        ("/b/c/./../g", "/b/g"),
        ("/b/c/./g/.", "/b/c/g/"),
        ("/b/c/g/./h", "/b/c/g/h"),
        ("/b/c/g/../h", "/b/c/h"),
        ("/b/c/g;x=1/./y", "/b/c/g;x=1/y"),
        ("/b/c/g;x=1/../y", "/b/c/y"),
        // 5.2.4
        ("/a/b/c/./../../g", "/a/g"),
    ];
    for (path, expected) in cases {
        assert_eq!(norm(path).as_deref(), Ok(expected), "{path}");
    }
}

#[test]
fn the_attacks_on_a_public_prefix_all_land_outside_it() {
    for path in [
        "/public/../admin/",
        "/public/%2e%2e/admin/",
        "/public/%2E%2E/admin/",
        "/public/%2e./admin/",
        "/public//../admin/",
        "/public/./../admin/",
    ] {
        assert_eq!(norm(path).as_deref(), Ok("/admin/"), "{path}");
    }
    assert_eq!(norm("/public/./x").as_deref(), Ok("/public/x"));
    assert_eq!(norm("/public/x").as_deref(), Ok("/public/x"));
}

#[test]
fn encodings_are_made_canonical() {
    // Unreserved characters decoded, the rest upper-cased, never decoded twice.
    assert_eq!(norm("/%7Euser/%61%2D%5f").as_deref(), Ok("/~user/a-_"));
    assert_eq!(norm("/a%20b/%c3%a9").as_deref(), Ok("/a%20b/%C3%A9"));
    assert_eq!(norm("/%2541").as_deref(), Ok("/%2541"));
    assert_eq!(norm("/%3f").as_deref(), Ok("/%3F"));
}

#[test]
fn what_cannot_be_normalized_safely_is_refused_with_its_reason() {
    let cases = [
        ("", PathError::Empty),
        ("public/x", PathError::NotAbsolute),
        ("http://a/b", PathError::NotAbsolute),
        ("/a%", PathError::InvalidEncoding { at: 2 }),
        ("/a%4", PathError::InvalidEncoding { at: 2 }),
        ("/a%zz", PathError::InvalidEncoding { at: 2 }),
        ("/a%00b", PathError::EncodedNul { at: 2 }),
        (
            "/public/..%2fadmin/",
            PathError::EscapedSlash {
                at: 10,
                escape: "%2F",
            },
        ),
        (
            "/public/..%5Cadmin/",
            PathError::EscapedSlash {
                at: 10,
                escape: "%5C",
            },
        ),
    ];
    for (path, error) in cases {
        assert_eq!(norm(path), Err(error.clone()), "{path}");
        assert!(error.kind().starts_with("path_"));
    }
    // Even with every step off, the checks stay.
    let off = PathNormalization {
        normalize_path: false,
        merge_slashes: false,
        escaped_slashes: EscapedSlashes::Keep,
    };
    assert_eq!(
        with("/a%zz", off),
        Err(PathError::InvalidEncoding { at: 2 })
    );
    assert_eq!(with("/a%00", off), Err(PathError::EncodedNul { at: 2 }));
}

#[test]
fn the_asterisk_form_passes_and_an_unchanged_path_is_borrowed() {
    assert_eq!(norm("*").as_deref(), Ok("*"));
    assert!(matches!(
        normalize("/a/b%20c", &PathNormalization::default()),
        Ok(Cow::Borrowed("/a/b%20c"))
    ));
}

#[test]
fn escaped_slashes_follow_the_setting() {
    let keep = PathNormalization {
        escaped_slashes: EscapedSlashes::Keep,
        ..PathNormalization::default()
    };
    let unescape = PathNormalization {
        escaped_slashes: EscapedSlashes::Unescape,
        ..PathNormalization::default()
    };
    // Kept encoded, `..%2F` is one segment (not a dot segment), so it stays under /public/.
    assert_eq!(
        with("/public/..%2fadmin/", keep).as_deref(),
        Ok("/public/..%2Fadmin/")
    );
    // Decoded, it is a separator, and the dot segment takes the path out of /public/.
    assert_eq!(
        with("/public/..%2fadmin/", unescape).as_deref(),
        Ok("/admin/")
    );
    assert_eq!(with("/a%5cb", unescape).as_deref(), Ok("/a\\b"));
}

#[test]
fn each_step_can_be_turned_off() {
    let no_merge = PathNormalization {
        merge_slashes: false,
        ..PathNormalization::default()
    };
    // RFC 3986 alone: the `..` removes the empty segment.
    assert_eq!(
        with("/public//../admin/", no_merge).as_deref(),
        Ok("/public/admin/")
    );
    assert_eq!(with("/a//b", no_merge).as_deref(), Ok("/a//b"));
    let no_normalize = PathNormalization {
        normalize_path: false,
        ..PathNormalization::default()
    };
    assert_eq!(
        with("/a//./%2e%2e/%7e", no_normalize).as_deref(),
        Ok("/a/./%2e%2e/%7e")
    );
}

/// A small deterministic generator of paths made of the pieces attacks use.
fn paths(count: usize) -> Vec<String> {
    const PIECES: &[&str] = &[
        "/", "/", "/", ".", "..", "a", "b", "%2e", "%2E", "%2f", "%5C", "%00", "%41", "%7e",
        "%c3%a9", "%zz", "%", "%2", ";", "//", "é", "\\", "?", "%25", "*",
    ];
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    (0..count)
        .map(|_| {
            let len = (next() % 12) as usize;
            let mut p = String::from(if next().is_multiple_of(8) { "" } else { "/" });
            for _ in 0..len {
                p.push_str(PIECES[(next() % PIECES.len() as u64) as usize]);
            }
            p
        })
        .collect()
}

#[test]
fn normalizing_is_idempotent_and_leaves_no_dot_segment_or_double_slash() {
    let settings = [
        PathNormalization::default(),
        PathNormalization {
            escaped_slashes: EscapedSlashes::Keep,
            ..PathNormalization::default()
        },
        PathNormalization {
            escaped_slashes: EscapedSlashes::Unescape,
            ..PathNormalization::default()
        },
        PathNormalization {
            merge_slashes: false,
            ..PathNormalization::default()
        },
    ];
    let mut normalized = 0;
    for settings in settings {
        for path in paths(20_000) {
            let Ok(once) = normalize(&path, &settings) else {
                continue;
            };
            normalized += 1;
            let twice = normalize(&once, &settings).expect("a normalized path normalizes");
            assert_eq!(once, twice, "not idempotent on {path:?}");
            if once == "*" {
                continue;
            }
            assert!(once.starts_with('/'), "{path:?} -> {once:?}");
            for bad in ["/../", "/./"] {
                assert!(!once.contains(bad), "{path:?} -> {once:?}");
            }
            assert!(
                !once.ends_with("/..") && !once.ends_with("/."),
                "{path:?} -> {once:?}"
            );
            if settings.merge_slashes {
                assert!(!once.contains("//"), "{path:?} -> {once:?}");
            }
        }
    }
    assert!(
        normalized > 10_000,
        "too few generated paths were valid: {normalized}"
    );
}

#[test]
fn any_bytes_are_answered_without_a_panic() {
    let mut state: u32 = 12345;
    for _ in 0..20_000 {
        state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
        let len = (state >> 16) as usize % 16;
        let bytes: Vec<u8> = (0..len)
            .map(|i| {
                state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
                let b = (state >> 16) as u8;
                if i == 0 && b.is_multiple_of(2) {
                    b'/'
                } else {
                    b
                }
            })
            .collect();
        for settings in [
            PathNormalization::default(),
            PathNormalization {
                escaped_slashes: EscapedSlashes::Unescape,
                ..PathNormalization::default()
            },
        ] {
            if let Ok(once) = normalize_bytes(&bytes, &settings) {
                let twice = normalize_bytes(&once, &settings).expect("normalizes again");
                assert_eq!(once, twice);
            }
            if let Ok(text) = std::str::from_utf8(&bytes) {
                let _ = normalize(text, &settings);
            }
        }
    }
}

#[test]
fn the_shortcut_for_normal_paths_agrees_with_the_full_steps() {
    let settings = [
        PathNormalization::default(),
        PathNormalization {
            merge_slashes: false,
            ..PathNormalization::default()
        },
        PathNormalization {
            normalize_path: false,
            ..PathNormalization::default()
        },
    ];
    let mut shortcut = 0;
    for settings in settings {
        for path in paths(20_000) {
            let bytes = path.as_bytes();
            if !bytes.starts_with(b"/") || !already_normal(bytes, &settings) {
                continue;
            }
            shortcut += 1;
            let decoded = decode(bytes, &settings).expect("no '%', nothing to refuse");
            let merged = if settings.merge_slashes {
                merge_slashes(&decoded)
            } else {
                decoded
            };
            let full = if settings.normalize_path {
                remove_dot_segments(&merged)
            } else {
                merged
            };
            assert_eq!(full, bytes, "{path:?}");
        }
    }
    assert!(
        shortcut > 1_000,
        "too few normal paths generated: {shortcut}"
    );
}

/// Found by the `http_path` fuzz target: a segment of invalid UTF-8 removed by `..` leaves a
/// UTF-8 path; UTF-8 input always gives UTF-8 output.
#[test]
fn a_dot_segment_may_remove_invalid_bytes_and_utf8_stays_utf8() {
    let settings = PathNormalization::default();
    let input = b"/a/b/c/./..\xFF\xFF\xFF\xFF\xFF/../g";
    let out = normalize_bytes(input, &settings).expect("normalizes");
    assert_eq!(out.as_ref(), b"/a/b/c/g");
    assert_eq!(
        norm("/caf\u{e9}/./\u{1f600}//x/../y"),
        Ok("/caf\u{e9}/\u{1f600}/y".into())
    );
}
