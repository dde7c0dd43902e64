//! SPIFFE IDs: the strings agents send in signing requests and the controller reads from
//! configuration, and the URI SAN of a peer's certificate.
//!
//! Invariants: parsing never panics; an accepted ID displays as exactly the input (the parser
//! accepts only canonical text) and parses back to the same value; what a certificate names
//! round-trips the same way.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_core::SpiffeId;
use mesh_core::identity::from_certificate;

fuzz_target!(|data: &[u8]| {
    // The leading byte chooses the input: 0 a certificate (DER), anything else a string.
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode == 0 {
        if let Ok(id) = from_certificate(rest) {
            round_trip(&id);
        }
        return;
    }
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    match text.parse::<SpiffeId>() {
        Ok(id) => {
            assert_eq!(id.to_string(), text, "accepted a non-canonical form");
            round_trip(&id);
        }
        Err(e) => assert!(!e.kind().is_empty() && !e.to_string().is_empty()),
    }
});

fn round_trip(id: &SpiffeId) {
    let text = id.to_string();
    let again: SpiffeId = text
        .parse()
        .unwrap_or_else(|e| panic!("{text:?} does not parse back: {e}"));
    assert_eq!(&again, id, "display -> parse changed the identity");
    assert_eq!(again.uri(), text);
}
