//! PROXY protocol version 2 (HAProxy's binary header), as Istio's ambient mesh uses it
//! (docs/hbone.md "PROXY protocol"): a node that terminates HBONE for a workload whose
//! `application_tunnel` is PROXY writes one header before the tunnel's bytes, carrying the
//! original client address, the CONNECT target and, in TLV 0xD0, the client's verified SPIFFE
//! identity; a waypoint behind such a node (the "sandwich") reads it back.
//!
//! Pure encoding and decoding, plus one reader that takes exactly the header's bytes from a
//! socket and nothing after them, so what follows stays the application's. Every length is
//! bounded before anything is read or allocated (reliability #12), and everything a receiver
//! acts on (command, family, addresses, identity) is refused when it is not exactly what this
//! mesh writes: TCP over IPv4 or IPv6, at most one identity, a canonical SPIFFE ID.
//! `decode` works on a byte slice, so a fuzzer can feed it anything.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt};

use crate::identity::{SpiffeError, SpiffeId};

/// The 12 bytes every v2 header starts with (chosen by the spec so that no text protocol,
/// v1 included, can start this way).
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Signature, version/command, family/transport, and the 2-byte length of what follows.
pub const FIXED_LEN: usize = 16;
/// ztunnel's TLV type for the peer's SPIFFE identity (a PP2 "custom" type, 0xD0-0xDF are
/// reserved for applications).
pub const TLV_PEER_IDENTITY: u8 = 0xD0;
/// The longest identity zmesh writes or accepts: the longest SPIFFE ID `SpiffeId` can hold,
/// `spiffe://` + a 255-byte trust domain + `/ns/` + 253 + `/sa/` + 253.
pub const MAX_IDENTITY_LEN: usize = 9 + 255 + 4 + 253 + 4 + 253;
/// Bound on the declared length (the bytes after the fixed 16). What zmesh writes needs at
/// most 36 (IPv6 addresses) + 3 + `MAX_IDENTITY_LEN` = 817 bytes; the rest leaves room for a few
/// other TLVs a peer may add (an authority, a unique id). A larger declaration is refused
/// before a byte of it is read.
pub const MAX_DECLARED_LEN: usize = 2048;

const VERSION_2: u8 = 0x2;
const CMD_LOCAL: u8 = 0x0;
const CMD_PROXY: u8 = 0x1;
/// Address family (high nibble) and transport (low nibble): TCP over IPv4 / IPv6.
const TCP4: u8 = 0x11;
const TCP6: u8 = 0x21;
const UNSPEC: u8 = 0x00;
const TCP4_ADDRS_LEN: usize = 4 + 4 + 2 + 2;
const TCP6_ADDRS_LEN: usize = 16 + 16 + 2 + 2;
/// A TLV's type byte and 2-byte length.
const TLV_HEAD: usize = 3;

/// What a header asks of the receiver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// The connection was made by the proxy itself (health checks): the receiver uses the
    /// socket's own addresses, and the header carries nothing it acts on.
    Local,
    /// Relayed for a client: the addresses (and TLVs) are the client's.
    Proxy,
}

/// One type-length-value record after the addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tlv {
    pub kind: u8,
    pub value: Vec<u8>,
}

/// A decoded header, or one to encode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub command: Command,
    /// (source, destination): the original client and the address it asked for. None for
    /// LOCAL.
    pub addresses: Option<(SocketAddr, SocketAddr)>,
    /// The peer's identity (TLV 0xD0), validated as a SPIFFE ID.
    pub identity: Option<SpiffeId>,
    /// Every other TLV, in order, uninterpreted.
    pub tlvs: Vec<Tlv>,
}

/// Why a header could not be written. Nothing is ever truncated to fit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error(
        "PROXY header addresses mix families ({src} and {dst}); both must be IPv4 or both IPv6"
    )]
    MixedFamilies { src: SocketAddr, dst: SocketAddr },
    #[error("a PROXY command needs source and destination addresses")]
    NoAddresses,
    #[error("identity is {len} bytes; a PROXY header carries at most {MAX_IDENTITY_LEN}")]
    IdentityTooLong { len: usize },
    #[error("identity {0:?} is not a SPIFFE ID a receiver would accept: {1}")]
    InvalidIdentity(String, SpiffeError),
    #[error("TLV 0x{kind:02X} given as a raw TLV; the identity goes in `identity`")]
    RawIdentityTlv { kind: u8 },
    #[error("TLV 0x{kind:02X} is {len} bytes; a TLV holds at most 65535")]
    TlvTooLong { kind: u8, len: usize },
    #[error("PROXY header would declare {len} bytes after its fixed part; the limit is {MAX_DECLARED_LEN}")]
    TooLong { len: usize },
}

/// Why bytes are not an acceptable PROXY v2 header. Each names what was wrong and where.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("reading the PROXY header: {0}")]
    Io(#[source] std::io::Error),
    #[error("connection ended after {got} of the PROXY header's {need} bytes")]
    Truncated { got: usize, need: usize },
    #[error("PROXY protocol v1 (text) header; only v2 is accepted")]
    VersionOne,
    #[error("first 12 bytes {0:02X?} are not the PROXY v2 signature; is the sender speaking PROXY protocol v2?")]
    Signature([u8; 12]),
    #[error("PROXY header version {0} (byte 13 is 0x{1:02X}); only version 2 is accepted")]
    Version(u8, u8),
    #[error("PROXY header command 0x{0:X} is neither LOCAL (0x0) nor PROXY (0x1)")]
    Command(u8),
    #[error("PROXY header family/transport 0x{0:02X} is not TCP over IPv4 (0x11) or IPv6 (0x21)")]
    Family(u8),
    #[error("PROXY header declares {declared} bytes after its fixed part; the limit is {MAX_DECLARED_LEN}")]
    TooLong { declared: usize },
    #[error("PROXY header declares {declared} bytes, fewer than the {need} its addresses take")]
    AddressesTruncated { declared: usize, need: usize },
    #[error("PROXY header TLV at offset {offset} needs 3 bytes of type and length, {left} left")]
    TlvHeadTruncated { offset: usize, left: usize },
    #[error("PROXY header TLV 0x{kind:02X} at offset {offset} says {len} bytes, only {left} left in the header")]
    TlvOverrun {
        kind: u8,
        offset: usize,
        len: usize,
        left: usize,
    },
    #[error("PROXY header carries two identity TLVs (0xD0); refusing an ambiguous peer")]
    DuplicateIdentity,
    #[error("PROXY header identity TLV is {len} bytes; the limit is {MAX_IDENTITY_LEN}")]
    IdentityTooLong { len: usize },
    #[error("PROXY header identity TLV is not UTF-8")]
    IdentityNotUtf8,
    #[error("PROXY header identity {0:?} is not a SPIFFE ID: {1}")]
    IdentityNotSpiffe(String, SpiffeError),
}

impl DecodeError {
    /// The metric label (`zmesh_rejected_total{reason}`) for this refusal.
    pub fn code(&self) -> &'static str {
        match self {
            DecodeError::Io(_) | DecodeError::Truncated { .. } => "proxy_header_truncated",
            DecodeError::VersionOne | DecodeError::Signature(_) => "proxy_header_signature",
            DecodeError::Version(..) | DecodeError::Command(_) | DecodeError::Family(_) => {
                "proxy_header_unsupported"
            }
            DecodeError::TooLong { .. } => "proxy_header_too_long",
            DecodeError::AddressesTruncated { .. }
            | DecodeError::TlvHeadTruncated { .. }
            | DecodeError::TlvOverrun { .. } => "proxy_header_malformed",
            DecodeError::DuplicateIdentity
            | DecodeError::IdentityTooLong { .. }
            | DecodeError::IdentityNotUtf8
            | DecodeError::IdentityNotSpiffe(..) => "proxy_header_identity",
        }
    }
}

impl Header {
    /// A PROXY (relayed) header for a TCP connection from `src` to `dst`.
    pub fn proxy(src: SocketAddr, dst: SocketAddr) -> Header {
        Header {
            command: Command::Proxy,
            addresses: Some((src, dst)),
            identity: None,
            tlvs: Vec::new(),
        }
    }

    /// A LOCAL header: no addresses, nothing for the receiver to act on.
    pub fn local() -> Header {
        Header {
            command: Command::Local,
            addresses: None,
            identity: None,
            tlvs: Vec::new(),
        }
    }

    pub fn with_identity(mut self, id: SpiffeId) -> Header {
        self.identity = Some(id);
        self
    }

    /// The header's bytes. The declared length always equals what follows the fixed 16
    /// bytes; anything that would not fit the limits is an error, never cut short.
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        let mut body = Vec::new();
        let family = match (self.command, self.addresses) {
            (Command::Local, _) => UNSPEC,
            (Command::Proxy, None) => return Err(EncodeError::NoAddresses),
            (Command::Proxy, Some((src, dst))) => match (src.ip(), dst.ip()) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    body.extend_from_slice(&s.octets());
                    body.extend_from_slice(&d.octets());
                    TCP4
                }
                (IpAddr::V6(s), IpAddr::V6(d)) => {
                    body.extend_from_slice(&s.octets());
                    body.extend_from_slice(&d.octets());
                    TCP6
                }
                _ => return Err(EncodeError::MixedFamilies { src, dst }),
            },
        };
        if let (Command::Proxy, Some((src, dst))) = (self.command, self.addresses) {
            body.extend_from_slice(&src.port().to_be_bytes());
            body.extend_from_slice(&dst.port().to_be_bytes());
        }
        if let Some(id) = &self.identity {
            let text = id.to_string();
            if text.len() > MAX_IDENTITY_LEN {
                return Err(EncodeError::IdentityTooLong { len: text.len() });
            }
            // `SpiffeId`'s fields are public: re-parse so that what is written is what the
            // receiver will accept, not whatever was put in them.
            SpiffeId::parse(&text).map_err(|e| EncodeError::InvalidIdentity(text.clone(), e))?;
            push_tlv(&mut body, TLV_PEER_IDENTITY, text.as_bytes())?;
        }
        for t in &self.tlvs {
            if t.kind == TLV_PEER_IDENTITY {
                return Err(EncodeError::RawIdentityTlv { kind: t.kind });
            }
            push_tlv(&mut body, t.kind, &t.value)?;
        }
        if body.len() > MAX_DECLARED_LEN {
            return Err(EncodeError::TooLong { len: body.len() });
        }
        let command = match self.command {
            Command::Local => CMD_LOCAL,
            Command::Proxy => CMD_PROXY,
        };
        let mut out = Vec::with_capacity(FIXED_LEN + body.len());
        out.extend_from_slice(&SIGNATURE);
        out.push(VERSION_2 << 4 | command);
        out.push(family);
        // Fits: checked against MAX_DECLARED_LEN above.
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(&body);
        Ok(out)
    }
}

fn push_tlv(body: &mut Vec<u8>, kind: u8, value: &[u8]) -> Result<(), EncodeError> {
    let len = u16::try_from(value.len()).map_err(|_| EncodeError::TlvTooLong {
        kind,
        len: value.len(),
    })?;
    body.push(kind);
    body.extend_from_slice(&len.to_be_bytes());
    body.extend_from_slice(value);
    Ok(())
}

/// Checks the fixed 16 bytes and returns (command, family, declared length).
fn fixed(b: &[u8; FIXED_LEN]) -> Result<(Command, u8, usize), DecodeError> {
    if b[..12] != SIGNATURE {
        if b.starts_with(b"PROXY ") {
            return Err(DecodeError::VersionOne);
        }
        let mut sig = [0u8; 12];
        sig.copy_from_slice(&b[..12]);
        return Err(DecodeError::Signature(sig));
    }
    let (version, cmd) = (b[12] >> 4, b[12] & 0x0F);
    if version != VERSION_2 {
        return Err(DecodeError::Version(version, b[12]));
    }
    let command = match cmd {
        CMD_LOCAL => Command::Local,
        CMD_PROXY => Command::Proxy,
        other => return Err(DecodeError::Command(other)),
    };
    let declared = usize::from(u16::from_be_bytes([b[14], b[15]]));
    if declared > MAX_DECLARED_LEN {
        return Err(DecodeError::TooLong { declared });
    }
    Ok((command, b[13], declared))
}

/// Reads the block after the fixed part: addresses, then TLVs up to exactly its end.
fn block(command: Command, family: u8, body: &[u8]) -> Result<Header, DecodeError> {
    if command == Command::Local {
        // The spec: a LOCAL header's block (family included) is discarded by the receiver.
        return Ok(Header::local());
    }
    let need = match family {
        TCP4 => TCP4_ADDRS_LEN,
        TCP6 => TCP6_ADDRS_LEN,
        other => return Err(DecodeError::Family(other)),
    };
    if body.len() < need {
        return Err(DecodeError::AddressesTruncated {
            declared: body.len(),
            need,
        });
    }
    let (src_ip, dst_ip, ports) = if family == TCP4 {
        let ip = |o: usize| {
            IpAddr::V4(Ipv4Addr::new(
                body[o],
                body[o + 1],
                body[o + 2],
                body[o + 3],
            ))
        };
        (ip(0), ip(4), 8)
    } else {
        let ip = |o: usize| {
            let mut a = [0u8; 16];
            a.copy_from_slice(&body[o..o + 16]);
            IpAddr::V6(Ipv6Addr::from(a))
        };
        (ip(0), ip(16), 32)
    };
    let port = |o: usize| u16::from_be_bytes([body[o], body[o + 1]]);
    let mut header = Header::proxy(
        SocketAddr::new(src_ip, port(ports)),
        SocketAddr::new(dst_ip, port(ports + 2)),
    );
    let mut at = need;
    while at < body.len() {
        let left = body.len() - at;
        if left < TLV_HEAD {
            return Err(DecodeError::TlvHeadTruncated { offset: at, left });
        }
        let kind = body[at];
        let len = usize::from(u16::from_be_bytes([body[at + 1], body[at + 2]]));
        let left = left - TLV_HEAD;
        if len > left {
            return Err(DecodeError::TlvOverrun {
                kind,
                offset: at,
                len,
                left,
            });
        }
        let value = &body[at + TLV_HEAD..at + TLV_HEAD + len];
        if kind == TLV_PEER_IDENTITY {
            if header.identity.is_some() {
                return Err(DecodeError::DuplicateIdentity);
            }
            header.identity = Some(identity(value)?);
        } else {
            header.tlvs.push(Tlv {
                kind,
                value: value.to_vec(),
            });
        }
        at += TLV_HEAD + len;
    }
    Ok(header)
}

fn identity(value: &[u8]) -> Result<SpiffeId, DecodeError> {
    if value.len() > MAX_IDENTITY_LEN {
        return Err(DecodeError::IdentityTooLong { len: value.len() });
    }
    let text = std::str::from_utf8(value).map_err(|_| DecodeError::IdentityNotUtf8)?;
    SpiffeId::parse(text).map_err(|e| DecodeError::IdentityNotSpiffe(text.to_string(), e))
}

/// Decodes the header at the start of `bytes`; returns it and how many bytes it took (what
/// follows is the application's). Bytes that end before the header does are `Truncated`.
/// Never panics, whatever the input: the entry point for fuzzing.
pub fn decode(bytes: &[u8]) -> Result<(Header, usize), DecodeError> {
    let Some(first) = bytes.first_chunk::<FIXED_LEN>() else {
        // Judge what is there: a wrong signature is wrong however short.
        let n = bytes.len().min(SIGNATURE.len());
        if bytes[..n] != SIGNATURE[..n] {
            let mut padded = [0u8; FIXED_LEN];
            padded[..bytes.len()].copy_from_slice(bytes);
            fixed(&padded)?;
        }
        return Err(DecodeError::Truncated {
            got: bytes.len(),
            need: FIXED_LEN,
        });
    };
    let (command, family, declared) = fixed(first)?;
    let total = FIXED_LEN + declared;
    let body = bytes.get(FIXED_LEN..total).ok_or(DecodeError::Truncated {
        got: bytes.len(),
        need: total,
    })?;
    Ok((block(command, family, body)?, total))
}

/// Reads exactly one header from `r`: the fixed 16 bytes, then exactly the declared length,
/// never a byte more, so everything after the header is still there for the caller. The
/// caller bounds the time it may take (a sender that stops half-way holds the read open).
pub async fn read_header<R: AsyncRead + Unpin>(r: &mut R) -> Result<Header, DecodeError> {
    let mut first = [0u8; FIXED_LEN];
    read_all(r, &mut first, 0, FIXED_LEN).await?;
    let (command, family, declared) = fixed(&first)?;
    let mut body = vec![0u8; declared];
    read_all(r, &mut body, FIXED_LEN, FIXED_LEN + declared).await?;
    block(command, family, &body)
}

/// `read_exact`, but an early end says how far the header got.
async fn read_all<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
    before: usize,
    need: usize,
) -> Result<(), DecodeError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]).await {
            Ok(0) => {
                return Err(DecodeError::Truncated {
                    got: before + got,
                    need,
                })
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(DecodeError::Io(e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    fn v4() -> Header {
        Header::proxy(
            "10.1.2.3:45678".parse().unwrap(),
            "10.9.8.7:8080".parse().unwrap(),
        )
        .with_identity(id("spiffe://cluster.local/ns/shop/sa/client"))
    }

    /// The longest identity `SpiffeId` can hold: every part at its limit.
    fn longest_identity() -> SpiffeId {
        SpiffeId::new(&"t".repeat(255), &"n".repeat(253), &"s".repeat(253)).unwrap()
    }

    #[test]
    fn ipv4_header_is_byte_exact_and_round_trips() {
        let h = v4();
        let bytes = h.encode().unwrap();
        let ident = b"spiffe://cluster.local/ns/shop/sa/client";
        let mut want = SIGNATURE.to_vec();
        want.extend_from_slice(&[0x21, 0x11]);
        want.extend_from_slice(&((12 + 3 + ident.len()) as u16).to_be_bytes());
        want.extend_from_slice(&[10, 1, 2, 3, 10, 9, 8, 7]);
        want.extend_from_slice(&45678u16.to_be_bytes());
        want.extend_from_slice(&8080u16.to_be_bytes());
        want.push(0xD0);
        want.extend_from_slice(&(ident.len() as u16).to_be_bytes());
        want.extend_from_slice(ident);
        assert_eq!(bytes, want);
        assert_eq!(decode(&bytes).unwrap(), (h, bytes.len()));
    }

    #[test]
    fn ipv6_header_round_trips_with_other_tlvs_kept_in_order() {
        let mut h = Header::proxy(
            "[fd00::1]:40000".parse().unwrap(),
            "[fd00:1::2]:443".parse().unwrap(),
        )
        .with_identity(id("spiffe://td/ns/a/sa/b"));
        h.tlvs = vec![
            Tlv {
                kind: 0x02,
                value: b"svc.example".to_vec(),
            },
            Tlv {
                kind: 0x05,
                value: vec![],
            },
        ];
        let bytes = h.encode().unwrap();
        assert_eq!(bytes[13], 0x21);
        assert_eq!(decode(&bytes).unwrap(), (h, bytes.len()));
    }

    #[test]
    fn header_without_identity_round_trips() {
        let h = Header::proxy("1.2.3.4:1".parse().unwrap(), "5.6.7.8:2".parse().unwrap());
        let bytes = h.encode().unwrap();
        assert_eq!(bytes.len(), FIXED_LEN + 12);
        assert_eq!(decode(&bytes).unwrap().0, h);
    }

    #[test]
    fn local_command_has_no_addresses_and_its_block_is_discarded() {
        let bytes = Header::local().encode().unwrap();
        assert_eq!(bytes.len(), FIXED_LEN);
        assert_eq!(bytes[12..], [0x20, 0x00, 0, 0]);
        assert_eq!(decode(&bytes).unwrap(), (Header::local(), FIXED_LEN));
        // A LOCAL header may carry a block (any family): it is skipped, exactly.
        let mut with_block = SIGNATURE.to_vec();
        with_block.extend_from_slice(&[0x20, 0x11, 0, 5, 1, 2, 3, 4, 5, b'x']);
        assert_eq!(decode(&with_block).unwrap(), (Header::local(), 21));
    }

    /// Reliability #12: a maximum-length identity; the declared length is exactly the bytes
    /// written after the fixed part, and the receiver reads it back whole.
    #[test]
    fn maximum_length_identity_declares_exactly_the_bytes_written() {
        let longest = longest_identity();
        assert_eq!(longest.to_string().len(), MAX_IDENTITY_LEN);
        for (src, dst, addrs) in [
            ("10.0.0.1:1", "10.0.0.2:2", TCP4_ADDRS_LEN),
            ("[::1]:1", "[::2]:2", TCP6_ADDRS_LEN),
        ] {
            let h = Header::proxy(src.parse().unwrap(), dst.parse().unwrap())
                .with_identity(longest.clone());
            let bytes = h.encode().unwrap();
            let declared = usize::from(u16::from_be_bytes([bytes[14], bytes[15]]));
            assert_eq!(declared, bytes.len() - FIXED_LEN);
            assert_eq!(declared, addrs + TLV_HEAD + MAX_IDENTITY_LEN);
            assert!(declared <= MAX_DECLARED_LEN);
            assert_eq!(decode(&bytes).unwrap(), (h, bytes.len()));
        }
    }

    #[test]
    fn over_limit_identity_is_refused_on_encode_not_truncated() {
        // `SpiffeId`'s fields are public, so a too-long one can be built; the encoder refuses it.
        let mut long = longest_identity();
        long.service_account.push('s');
        let h = v4().with_identity(long);
        assert_eq!(
            h.encode(),
            Err(EncodeError::IdentityTooLong {
                len: MAX_IDENTITY_LEN + 1
            })
        );
        let mut bad = id("spiffe://td/ns/a/sa/b");
        bad.namespace = "A/B".into();
        assert!(matches!(
            v4().with_identity(bad).encode(),
            Err(EncodeError::InvalidIdentity(..))
        ));
    }

    #[test]
    fn encoder_refuses_what_it_cannot_write_faithfully() {
        let mixed = Header::proxy("10.0.0.1:1".parse().unwrap(), "[::1]:2".parse().unwrap());
        assert!(matches!(
            mixed.encode(),
            Err(EncodeError::MixedFamilies { .. })
        ));
        let mut no_addr = Header::local();
        no_addr.command = Command::Proxy;
        assert_eq!(no_addr.encode(), Err(EncodeError::NoAddresses));
        let mut raw = v4();
        raw.tlvs.push(Tlv {
            kind: TLV_PEER_IDENTITY,
            value: b"spiffe://td/ns/a/sa/b".to_vec(),
        });
        assert_eq!(
            raw.encode(),
            Err(EncodeError::RawIdentityTlv { kind: 0xD0 })
        );
        let mut big = v4();
        big.tlvs.push(Tlv {
            kind: 0x02,
            value: vec![b'a'; MAX_DECLARED_LEN],
        });
        assert!(matches!(big.encode(), Err(EncodeError::TooLong { .. })));
        let mut huge = v4();
        huge.tlvs.push(Tlv {
            kind: 0x02,
            value: vec![0; 70_000],
        });
        assert!(matches!(huge.encode(), Err(EncodeError::TlvTooLong { .. })));
    }

    /// A valid v4 header whose block is `block` (declared length set to match).
    fn with_block(family: u8, block: &[u8]) -> Vec<u8> {
        let mut b = SIGNATURE.to_vec();
        b.push(0x21);
        b.push(family);
        b.extend_from_slice(&(block.len() as u16).to_be_bytes());
        b.extend_from_slice(block);
        b
    }

    fn addrs4() -> Vec<u8> {
        vec![10, 0, 0, 1, 10, 0, 0, 2, 0, 80, 0, 81]
    }

    fn tlv(kind: u8, value: &[u8]) -> Vec<u8> {
        let mut t = vec![kind];
        t.extend_from_slice(&(value.len() as u16).to_be_bytes());
        t.extend_from_slice(value);
        t
    }

    #[test]
    fn every_malformed_header_is_refused_with_what_was_wrong() {
        let good = v4().encode().unwrap();
        let mutate = |at: usize, v: u8| {
            let mut b = good.clone();
            b[at] = v;
            b
        };
        let over = {
            let mut b = good.clone();
            b[14..16].copy_from_slice(&((MAX_DECLARED_LEN + 1) as u16).to_be_bytes());
            b
        };
        let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![
            (
                "v1 text",
                b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n".to_vec(),
                "proxy_header_signature",
                "v1",
            ),
            (
                "HTTP instead",
                b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
                "proxy_header_signature",
                "not the PROXY v2 signature",
            ),
            (
                "bad signature byte",
                mutate(11, b'X'),
                "proxy_header_signature",
                "signature",
            ),
            (
                "version 1",
                mutate(12, 0x11),
                "proxy_header_unsupported",
                "version 1",
            ),
            (
                "version 3",
                mutate(12, 0x31),
                "proxy_header_unsupported",
                "version 3",
            ),
            (
                "command 2",
                mutate(12, 0x22),
                "proxy_header_unsupported",
                "command 0x2",
            ),
            ("UDP", mutate(13, 0x12), "proxy_header_unsupported", "0x12"),
            ("unix", mutate(13, 0x31), "proxy_header_unsupported", "0x31"),
            (
                "unspec PROXY",
                mutate(13, 0x00),
                "proxy_header_unsupported",
                "0x00",
            ),
            (
                "declared over limit",
                over,
                "proxy_header_too_long",
                "limit is 2048",
            ),
            (
                "addresses cut",
                with_block(0x11, &addrs4()[..11]),
                "proxy_header_malformed",
                "fewer than the 12",
            ),
            (
                "v6 family, v4 room",
                with_block(0x21, &addrs4()),
                "proxy_header_malformed",
                "fewer than the 36",
            ),
            (
                "TLV head cut",
                with_block(0x11, &[addrs4(), vec![0xD0, 0]].concat()),
                "proxy_header_malformed",
                "needs 3 bytes",
            ),
            (
                "TLV overruns the header",
                with_block(0x11, &[addrs4(), vec![0x02, 0, 10, b'a']].concat()),
                "proxy_header_malformed",
                "says 10 bytes, only 1 left",
            ),
            (
                "identity overruns the header",
                with_block(0x11, &[addrs4(), vec![0xD0, 0xFF, 0xFF]].concat()),
                "proxy_header_malformed",
                "TLV 0xD0",
            ),
            (
                "identity not UTF-8",
                with_block(
                    0x11,
                    &[addrs4(), tlv(0xD0, b"spiffe://td/ns/\xff/sa/b")].concat(),
                ),
                "proxy_header_identity",
                "not UTF-8",
            ),
            (
                "identity not SPIFFE",
                with_block(
                    0x11,
                    &[addrs4(), tlv(0xD0, b"https://td/ns/a/sa/b")].concat(),
                ),
                "proxy_header_identity",
                "not a SPIFFE ID",
            ),
            (
                "identity empty",
                with_block(0x11, &[addrs4(), tlv(0xD0, b"")].concat()),
                "proxy_header_identity",
                "not a SPIFFE ID",
            ),
            (
                "identity with NUL",
                with_block(
                    0x11,
                    &[addrs4(), tlv(0xD0, b"spiffe://td/ns/a/sa/b\0")].concat(),
                ),
                "proxy_header_identity",
                "not a SPIFFE ID",
            ),
            (
                "identity over limit",
                with_block(
                    0x11,
                    &[addrs4(), tlv(0xD0, &vec![b'a'; MAX_IDENTITY_LEN + 1])].concat(),
                ),
                "proxy_header_identity",
                "limit is 778",
            ),
            (
                "two identities",
                with_block(
                    0x11,
                    &[
                        addrs4(),
                        tlv(0xD0, b"spiffe://td/ns/a/sa/b"),
                        tlv(0xD0, b"spiffe://td/ns/a/sa/c"),
                    ]
                    .concat(),
                ),
                "proxy_header_identity",
                "two identity TLVs",
            ),
        ];
        for (name, bytes, code, words) in cases {
            let e = decode(&bytes).expect_err(name);
            assert_eq!(e.code(), code, "{name}: {e}");
            assert!(
                e.to_string().contains(words),
                "{name}: {e:?} lacks {words:?}"
            );
        }
    }

    #[test]
    fn short_input_is_truncated_unless_already_wrong() {
        let good = v4().encode().unwrap();
        for cut in 0..good.len() {
            match decode(&good[..cut]) {
                Err(DecodeError::Truncated { got, need }) => {
                    assert_eq!(got, cut);
                    assert!(need > cut);
                }
                other => panic!("cut at {cut}: {other:?}"),
            }
        }
        assert!(matches!(decode(b"GET"), Err(DecodeError::Signature(_))));
    }

    #[tokio::test]
    async fn reader_takes_the_header_and_leaves_the_bytes_after_it() {
        let mut wire = v4().encode().unwrap();
        wire.extend_from_slice(b"hello after the header");
        let (mut tx, mut rx) = tokio::io::duplex(8);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            // Dribbled in small writes: the reader must not depend on one read per header.
            for chunk in wire.chunks(5) {
                tx.write_all(chunk).await.unwrap();
            }
        });
        assert_eq!(read_header(&mut rx).await.unwrap(), v4());
        let mut rest = Vec::new();
        rx.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"hello after the header");
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn reader_refuses_over_limit_before_reading_the_body() {
        let mut wire = SIGNATURE.to_vec();
        wire.extend_from_slice(&[0x21, 0x11, 0xFF, 0xFF]);
        // Nothing else is ever sent: the error comes from the fixed part alone.
        let (mut tx, mut rx) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut tx, &wire)
            .await
            .unwrap();
        let e = read_header(&mut rx).await.unwrap_err();
        assert!(matches!(e, DecodeError::TooLong { declared: 65535 }), "{e}");
        drop(tx);
    }

    #[tokio::test]
    async fn reader_names_how_far_a_cut_header_got() {
        let good = v4().encode().unwrap();
        let mut half = &good[..20];
        let e = read_header(&mut half).await.unwrap_err();
        assert!(
            e.to_string().contains(&format!(
                "after 20 of the PROXY header's {} bytes",
                good.len()
            )),
            "{e}"
        );
    }
}
