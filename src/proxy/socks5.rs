//! SOCKS5 (RFC 1928) as `zmesh-node connect` speaks it: the method-selection greeting and the
//! request, parsed as pure functions over the bytes received so far, and the replies. Only
//! "no authentication" (method 0x00) and CONNECT are offered: the mesh identity comes from this
//! machine's certificate, and who may use the listener is decided by `allow_from`, not by a
//! SOCKS username.
//!
//! Each parser returns `Ok(None)` while the bytes so far are a valid prefix (read more, within
//! the deadline), `Ok(Some((value, consumed)))` once complete, or the error that decides the
//! reply. A message is at most [`MAX_GREETING`] / [`MAX_REQUEST`] bytes, so a reader never
//! needs to buffer more.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

pub const VERSION: u8 = 0x05;
/// Method 0x00: no authentication required.
pub const METHOD_NO_AUTH: u8 = 0x00;
/// "No acceptable methods": the client then closes.
pub const METHOD_NONE_ACCEPTABLE: u8 = 0xff;
pub const CMD_CONNECT: u8 = 0x01;
pub const ATYP_IPV4: u8 = 0x01;
pub const ATYP_DOMAIN: u8 = 0x03;
pub const ATYP_IPV6: u8 = 0x04;
/// VER, NMETHODS and up to 255 methods.
pub const MAX_GREETING: usize = 2 + 255;
/// VER, CMD, RSV, ATYP, a length byte and a 255-byte name, the port.
pub const MAX_REQUEST: usize = 4 + 1 + 255 + 2;

/// The reply codes of RFC 1928 section 6 that connect sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Reply {
    Succeeded = 0x00,
    GeneralFailure = 0x01,
    NotAllowed = 0x02,
    HostUnreachable = 0x04,
    ConnectionRefused = 0x05,
    CommandNotSupported = 0x07,
    AddressTypeNotSupported = 0x08,
}

/// A CONNECT request's destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    Addr(SocketAddr),
    /// DOMAINNAME: resolved through the mesh model, never system DNS. Any bytes but NUL are
    /// kept (lossily as UTF-8); a name that is no service is then simply unknown.
    Domain {
        name: String,
        port: u16,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Socks5Error {
    #[error("SOCKS version {0:#04x}, not 5")]
    WrongVersion(u8),
    #[error("the greeting offers no authentication method")]
    NoMethods,
    #[error("the greeting does not offer method 0x00 (no authentication), the only one served")]
    NoAcceptableMethod,
    #[error("command {0:#04x} is not supported (CONNECT only)")]
    UnsupportedCommand(u8),
    #[error("address type {0:#04x} is not supported (IPv4, DOMAINNAME, IPv6 only)")]
    UnsupportedAddressType(u8),
    #[error("the domain name is empty")]
    EmptyDomain,
    #[error("destination port 0")]
    PortZero,
    #[error("the client closed before its message was complete ({0} bytes)")]
    Truncated(usize),
}

impl Socks5Error {
    /// The reply a request error gets (greeting errors get a method selection instead, or
    /// nothing: see `greeting_reply`).
    pub fn reply(&self) -> Reply {
        match self {
            Socks5Error::UnsupportedCommand(_) => Reply::CommandNotSupported,
            Socks5Error::UnsupportedAddressType(_) => Reply::AddressTypeNotSupported,
            Socks5Error::EmptyDomain => Reply::HostUnreachable,
            _ => Reply::GeneralFailure,
        }
    }

    /// The label counted in `zmesh_rejected_total{listener="socks5"}`.
    pub fn code(&self) -> &'static str {
        match self {
            Socks5Error::WrongVersion(_) => "socks5_wrong_version",
            Socks5Error::NoMethods => "socks5_no_methods",
            Socks5Error::NoAcceptableMethod => "socks5_no_acceptable_method",
            Socks5Error::UnsupportedCommand(_) => "socks5_unsupported_command",
            Socks5Error::UnsupportedAddressType(_) => "socks5_unsupported_address_type",
            Socks5Error::EmptyDomain => "socks5_empty_domain",
            Socks5Error::PortZero => "socks5_port_zero",
            Socks5Error::Truncated(_) => "socks5_truncated",
        }
    }
}

/// Parses the method-selection message: `Ok(Some(consumed))` when it offers no-auth.
pub fn parse_greeting(buf: &[u8]) -> Result<Option<usize>, Socks5Error> {
    let Some(&ver) = buf.first() else {
        return Ok(None);
    };
    if ver != VERSION {
        return Err(Socks5Error::WrongVersion(ver));
    }
    let Some(&n) = buf.get(1) else {
        return Ok(None);
    };
    if n == 0 {
        return Err(Socks5Error::NoMethods);
    }
    let end = 2 + usize::from(n);
    let Some(methods) = buf.get(2..end) else {
        return Ok(None);
    };
    if !methods.contains(&METHOD_NO_AUTH) {
        return Err(Socks5Error::NoAcceptableMethod);
    }
    Ok(Some(end))
}

/// How long the greeting whose first bytes are `prefix` is, as far as they say (at least 2).
pub fn greeting_len(prefix: &[u8]) -> usize {
    match prefix.get(1) {
        None => 2,
        Some(&n) => 2 + usize::from(n),
    }
}

/// How long the request whose first bytes are `prefix` is, as far as they say (at least 4).
pub fn request_len(prefix: &[u8]) -> usize {
    match (prefix.get(3), prefix.get(4)) {
        (None, _) => 4,
        (Some(&ATYP_IPV4), _) => 4 + 4 + 2,
        (Some(&ATYP_IPV6), _) => 4 + 16 + 2,
        (Some(&ATYP_DOMAIN), None) => 5,
        (Some(&ATYP_DOMAIN), Some(&n)) => 5 + usize::from(n) + 2,
        // Unsupported: the parser refuses it before more is read.
        (Some(_), _) => 4,
    }
}

/// The method-selection reply: no-auth chosen, or (for a greeting without it) none acceptable.
pub fn greeting_reply(result: Result<(), &Socks5Error>) -> Option<[u8; 2]> {
    match result {
        Ok(()) => Some([VERSION, METHOD_NO_AUTH]),
        Err(Socks5Error::NoAcceptableMethod) | Err(Socks5Error::NoMethods) => {
            Some([VERSION, METHOD_NONE_ACCEPTABLE])
        }
        // A client that does not speak SOCKS5 gets no SOCKS5 answer, only the close.
        _ => None,
    }
}

/// Parses a request: `Ok(Some((destination, consumed)))` for a complete CONNECT.
pub fn parse_request(buf: &[u8]) -> Result<Option<(Destination, usize)>, Socks5Error> {
    let Some(&ver) = buf.first() else {
        return Ok(None);
    };
    if ver != VERSION {
        return Err(Socks5Error::WrongVersion(ver));
    }
    let Some(&cmd) = buf.get(1) else {
        return Ok(None);
    };
    if cmd != CMD_CONNECT {
        return Err(Socks5Error::UnsupportedCommand(cmd));
    }
    // buf[2] is RSV; RFC 1928 says 0x00, and nothing depends on it.
    let Some(&atyp) = buf.get(3) else {
        return Ok(None);
    };
    let (addr_len, addr_start) = match atyp {
        ATYP_IPV4 => (4, 4),
        ATYP_IPV6 => (16, 4),
        ATYP_DOMAIN => match buf.get(4) {
            None => return Ok(None),
            Some(0) => return Err(Socks5Error::EmptyDomain),
            Some(&n) => (usize::from(n), 5),
        },
        other => return Err(Socks5Error::UnsupportedAddressType(other)),
    };
    let end = addr_start + addr_len + 2;
    let Some(msg) = buf.get(..end) else {
        return Ok(None);
    };
    let addr = &msg[addr_start..addr_start + addr_len];
    let port = u16::from_be_bytes([msg[end - 2], msg[end - 1]]);
    if port == 0 {
        return Err(Socks5Error::PortZero);
    }
    let dst = match atyp {
        ATYP_IPV4 => {
            let a: [u8; 4] = addr.try_into().expect("4 bytes");
            Destination::Addr(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(a)), port))
        }
        ATYP_IPV6 => {
            let a: [u8; 16] = addr.try_into().expect("16 bytes");
            Destination::Addr(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(a)), port))
        }
        _ => Destination::Domain {
            name: String::from_utf8_lossy(addr).into_owned(),
            port,
        },
    };
    Ok(Some((dst, end)))
}

/// A reply with an all-zero IPv4 bound address: connect binds no address of its own that the
/// client could use (BIND is not served), and clients ignore it for CONNECT.
pub fn reply(code: Reply) -> [u8; 10] {
    [VERSION, code as u8, 0x00, ATYP_IPV4, 0, 0, 0, 0, 0, 0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greetings() {
        assert_eq!(parse_greeting(&[5, 1, 0]), Ok(Some(3)));
        assert_eq!(
            parse_greeting(&[5, 3, 2, 1, 0, 9]),
            Ok(Some(5)),
            "extra bytes stay"
        );
        assert_eq!(greeting_reply(Ok(())), Some([5, 0]));
        // Truncated: each prefix of a valid greeting asks for more.
        for n in 0..3 {
            assert_eq!(
                parse_greeting(&[5, 2, 2, 0][..n]),
                Ok(None),
                "prefix of {n}"
            );
        }
        assert_eq!(parse_greeting(&[5, 2, 2]), Ok(None));
        assert_eq!(
            parse_greeting(&[4, 1, 0]),
            Err(Socks5Error::WrongVersion(4))
        );
        assert_eq!(greeting_reply(Err(&Socks5Error::WrongVersion(4))), None);
        assert_eq!(greeting_reply(Err(&Socks5Error::Truncated(1))), None);
        assert_eq!(
            parse_greeting(b"GET / HTTP/1.1\r\n"),
            Err(Socks5Error::WrongVersion(b'G'))
        );
        assert_eq!(parse_greeting(&[5, 0]), Err(Socks5Error::NoMethods));
        let only_auth = parse_greeting(&[5, 2, 1, 2]);
        assert_eq!(only_auth, Err(Socks5Error::NoAcceptableMethod));
        assert_eq!(
            greeting_reply(only_auth.as_ref().map(|_| ())),
            Some([5, 0xff])
        );
        assert_eq!(
            greeting_reply(Err(&Socks5Error::NoMethods)),
            Some([5, 0xff])
        );
    }

    #[test]
    fn requests() {
        let v4 = [5, 1, 0, 1, 10, 96, 0, 10, 0x15, 0x38];
        assert_eq!(
            parse_request(&v4),
            Ok(Some((
                Destination::Addr("10.96.0.10:5432".parse().unwrap()),
                10
            )))
        );
        let mut v6 = vec![5, 1, 0, 4];
        v6.extend("fd00::7".parse::<Ipv6Addr>().unwrap().octets());
        v6.extend([0, 80]);
        assert_eq!(
            parse_request(&v6),
            Ok(Some((
                Destination::Addr("[fd00::7]:80".parse().unwrap()),
                22
            )))
        );
        let mut dom = vec![5, 1, 0, 3, 11];
        dom.extend(b"pg.data.svc");
        dom.extend([0x15, 0x38]);
        assert_eq!(
            parse_request(&dom),
            Ok(Some((
                Destination::Domain {
                    name: "pg.data.svc".into(),
                    port: 5432
                },
                18
            )))
        );
        // Every strict prefix is incomplete, not an error.
        for msg in [&v4[..], &v6[..], &dom[..]] {
            for n in 0..msg.len() {
                assert_eq!(parse_request(&msg[..n]), Ok(None), "{msg:?} cut at {n}");
            }
        }
    }

    #[test]
    fn malformed_requests_get_their_reply() {
        let cases: [(&[u8], Socks5Error, Reply); 7] = [
            (
                &[4, 1, 0, 1],
                Socks5Error::WrongVersion(4),
                Reply::GeneralFailure,
            ),
            (
                &[5, 2, 0, 1],
                Socks5Error::UnsupportedCommand(2),
                Reply::CommandNotSupported,
            ),
            (
                &[5, 3, 0, 1],
                Socks5Error::UnsupportedCommand(3),
                Reply::CommandNotSupported,
            ),
            (
                &[5, 1, 0, 2],
                Socks5Error::UnsupportedAddressType(2),
                Reply::AddressTypeNotSupported,
            ),
            (
                &[5, 1, 0, 0xff],
                Socks5Error::UnsupportedAddressType(0xff),
                Reply::AddressTypeNotSupported,
            ),
            (
                &[5, 1, 0, 3, 0, 0, 80],
                Socks5Error::EmptyDomain,
                Reply::HostUnreachable,
            ),
            (
                &[5, 1, 0, 1, 10, 0, 0, 1, 0, 0],
                Socks5Error::PortZero,
                Reply::GeneralFailure,
            ),
        ];
        for (bytes, err, code) in cases {
            let got = parse_request(bytes).unwrap_err();
            assert_eq!(got, err, "{bytes:?}");
            assert_eq!(got.reply(), code, "{bytes:?}");
            assert!(!got.code().is_empty());
        }
        assert_eq!(
            reply(Reply::CommandNotSupported),
            [5, 7, 0, 1, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(reply(Reply::NotAllowed)[1], 0x02);
    }

    #[test]
    fn lengths_follow_the_prefix() {
        assert_eq!(greeting_len(&[]), 2);
        assert_eq!(greeting_len(&[5, 3]), 5);
        assert_eq!(request_len(&[5, 1, 0]), 4);
        assert_eq!(request_len(&[5, 1, 0, 1]), 10);
        assert_eq!(request_len(&[5, 1, 0, 4]), 22);
        assert_eq!(request_len(&[5, 1, 0, 3]), 5);
        assert_eq!(request_len(&[5, 1, 0, 3, 11]), 18);
        assert_eq!(request_len(&[5, 1, 0, 3, 255]), MAX_REQUEST);
    }

    #[test]
    fn messages_are_bounded() {
        let mut longest = vec![5, 1, 0, 3, 255];
        longest.extend([b'a'; 255]);
        longest.extend([0, 1]);
        assert_eq!(longest.len(), MAX_REQUEST);
        assert!(matches!(parse_request(&longest), Ok(Some((_, n))) if n == MAX_REQUEST));
        let mut greeting = vec![5, 255];
        greeting.extend(0..=254u8);
        assert_eq!(greeting.len(), MAX_GREETING);
        assert_eq!(parse_greeting(&greeting), Ok(Some(MAX_GREETING)));
    }
}
