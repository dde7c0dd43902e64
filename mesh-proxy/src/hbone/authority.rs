//! The strict parser of the CONNECT `:authority`: exactly the canonical text of an IPv4
//! socket address, as `SocketAddrV4`'s `Display` writes it.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

/// Why an `:authority` was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the authority is not a canonical IPv4 ip:port: {0}")]
pub struct AuthorityError(&'static str);

impl AuthorityError {
    pub fn reason(&self) -> &'static str {
        self.0
    }
}

/// The longest canonical form, `255.255.255.255:65535`.
const MAX_LEN: usize = 21;

/// Parses `a.b.c.d:port`: four decimal octets 0..=255 and a decimal port 1..=65535, without
/// leading zeros, signs, spaces, brackets, user information or a path. Accepts exactly the
/// strings `SocketAddrV4::to_string` produces (with a non-zero port).
pub fn parse_authority(input: &[u8]) -> Result<SocketAddr, AuthorityError> {
    if input.len() > MAX_LEN {
        return Err(AuthorityError("too long"));
    }
    let mut parts = input.splitn(2, |b| *b == b':');
    let host = parts.next().unwrap_or_default();
    let port = parts.next().ok_or(AuthorityError("no port"))?;

    let mut octets = [0u8; 4];
    let mut fields = host.split(|b| *b == b'.');
    for octet in &mut octets {
        let field = fields
            .next()
            .ok_or(AuthorityError("fewer than four octets"))?;
        let value = decimal(field, 3).ok_or(AuthorityError("bad octet"))?;
        *octet = u8::try_from(value).map_err(|_| AuthorityError("octet above 255"))?;
    }
    if fields.next().is_some() {
        return Err(AuthorityError("more than four octets"));
    }

    let port = decimal(port, 5).ok_or(AuthorityError("bad port"))?;
    let port = u16::try_from(port).map_err(|_| AuthorityError("port above 65535"))?;
    if port == 0 {
        return Err(AuthorityError("port 0"));
    }
    Ok(SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::from(octets),
        port,
    )))
}

/// A canonical decimal number of 1 to `max_digits` ASCII digits: no leading zero unless it
/// is `0` itself.
fn decimal(field: &[u8], max_digits: usize) -> Option<u32> {
    if field.is_empty() || field.len() > max_digits {
        return None;
    }
    if field.len() > 1 && field[0] == b'0' {
        return None;
    }
    field.iter().try_fold(0u32, |acc, b| {
        b.is_ascii_digit().then(|| acc * 10 + u32::from(b - b'0'))
    })
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    #[test]
    fn accepts_canonical_addresses() {
        for s in [
            "0.0.0.0:1",
            "10.1.2.3:8080",
            "127.0.0.1:65535",
            "255.255.255.255:65535",
            "192.168.0.10:80",
        ] {
            let addr = parse_authority(s.as_bytes()).expect(s);
            assert_eq!(addr.to_string(), s);
        }
    }

    #[test]
    fn refuses_everything_else() {
        for s in [
            "",
            ":",
            "10.1.2.3",
            "10.1.2.3:",
            "10.1.2.3:0",
            "10.1.2.3:65536",
            "10.1.2.3:080",
            "10.1.2.3:+80",
            "10.1.2.3:-1",
            "10.1.2.3:80 ",
            " 10.1.2.3:80",
            "010.1.2.3:80",
            "10.1.2.256:80",
            "10.1.2:80",
            "10.1.2.3.4:80",
            "10..2.3:80",
            "user@10.1.2.3:80",
            "10.1.2.3:80/path",
            "10.1.2.3:80:81",
            "[::1]:80",
            "::1:80",
            "localhost:80",
            "example.com:443",
            "0x7f.0.0.1:80",
            "10.1.2.3:8080\0",
            "1111.1.1.1:80",
        ] {
            assert!(parse_authority(s.as_bytes()).is_err(), "accepted {s:?}");
        }
    }

    /// The oracle: `input` is the canonical text of an IPv4 socket address with a non-zero
    /// port.
    fn canonical(input: &[u8]) -> bool {
        std::str::from_utf8(input)
            .ok()
            .and_then(|s| SocketAddrV4::from_str(s).ok())
            .is_some_and(|a| a.port() != 0 && a.to_string().as_bytes() == input)
    }

    fn check(input: &[u8]) {
        match parse_authority(input) {
            Ok(addr) => {
                assert_eq!(
                    addr.to_string().as_bytes(),
                    input,
                    "accepted a non-canonical form"
                );
                assert!(canonical(input), "accepted {input:?}");
            }
            Err(_) => assert!(!canonical(input), "refused canonical {input:?}"),
        }
    }

    /// Random byte strings, biased towards the authority alphabet so that many are close to
    /// valid: the parser never panics and accepts exactly the canonical forms.
    #[test]
    fn random_inputs_accept_only_canonical_forms() {
        const ALPHABET: &[u8] = b"0123456789..::0125@/[]x -+";
        let mut rng = StdRng::seed_from_u64(0x4b0e_15008);
        let mut accepted = 0;
        for _ in 0..200_000 {
            let len = rng.random_range(0..=26);
            let input: Vec<u8> = (0..len)
                .map(|_| {
                    if rng.random_bool(0.9) {
                        ALPHABET[rng.random_range(0..ALPHABET.len())]
                    } else {
                        rng.random()
                    }
                })
                .collect();
            check(&input);
            accepted += usize::from(parse_authority(&input).is_ok());
        }
        // Mutations of valid addresses: one byte replaced, inserted or removed.
        for _ in 0..100_000 {
            let addr = SocketAddrV4::new(
                Ipv4Addr::from(rng.random::<u32>()),
                rng.random_range(0..=u16::MAX),
            );
            let mut input = addr.to_string().into_bytes();
            check(&input);
            let at = rng.random_range(0..input.len());
            match rng.random_range(0..3) {
                0 => input[at] = rng.random(),
                1 => input.insert(at, ALPHABET[rng.random_range(0..ALPHABET.len())]),
                _ => {
                    input.remove(at);
                }
            }
            check(&input);
            accepted += usize::from(parse_authority(&input).is_ok());
        }
        assert!(accepted > 0, "the generator reaches valid inputs");
    }
}
