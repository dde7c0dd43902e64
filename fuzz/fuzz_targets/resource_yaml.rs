//! A YAML stream, as the controller reads a file of its local source (or, one object each, the
//! Kubernetes API), into resources: Kubernetes objects, SMI and Gateway API routes.
//!
//! Invariants: parsing never panics; it is deterministic; every resource it accepts has a name,
//! and a namespace exactly when its kind is namespaced; a YAML syntax error is the last result
//! of a stream (the rest cannot be read); every error has a message and a metrics label.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_controller::resource::{ResourceError, parse_yaml_stream};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let results = parse_yaml_stream(text);
    for (i, result) in results.iter().enumerate() {
        match result {
            Ok(resource) => {
                let key = resource.key();
                assert!(!key.name.is_empty(), "accepted a resource without a name");
                assert_eq!(
                    key.namespace.is_empty(),
                    !key.kind.is_namespaced(),
                    "namespace of {key}"
                );
            }
            Err(e) => {
                assert!(!e.to_string().is_empty());
                assert!(!e.kind().is_empty());
                if matches!(e, ResourceError::Yaml { .. }) {
                    assert_eq!(i + 1, results.len(), "results after a YAML error");
                }
            }
        }
    }
    let again = parse_yaml_stream(text);
    assert_eq!(results.len(), again.len(), "parsing is not deterministic");
    for (a, b) in results.iter().zip(&again) {
        match (a, b) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "parsing is not deterministic"),
            (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
            _ => panic!("parsing is not deterministic: {a:?} then {b:?}"),
        }
    }
});
