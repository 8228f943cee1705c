//! Minimal Ethernet / IPv4 / IPv6 / TCP / UDP decoder for captured frames.
//!
//! Tests use it to answer "did plaintext X cross this wire?" and "which
//! ports did the tunnel use?", so it is deliberately lenient: it never
//! fails, it just leaves fields it cannot decode as `None`, and the raw
//! bytes are always kept for substring searches.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// IP protocol number of TCP.
pub const IPPROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const IPPROTO_UDP: u8 = 17;

const ETH_HLEN: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const ETHERTYPE_VLAN: u16 = 0x8100;

/// One captured link-layer frame and what could be decoded from it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Frame {
    /// Sent by this host (`PACKET_OUTGOING`) rather than received; a veth
    /// capture sees both directions.
    pub outgoing: bool,
    /// EtherType after any single 802.1Q tag (0 if the frame is too short).
    pub ethertype: u16,
    /// IP source address.
    pub src: Option<IpAddr>,
    /// IP destination address.
    pub dst: Option<IpAddr>,
    /// IP protocol / IPv6 next header (see [`IPPROTO_TCP`], [`IPPROTO_UDP`]).
    pub proto: Option<u8>,
    /// TCP/UDP source port.
    pub src_port: Option<u16>,
    /// TCP/UDP destination port.
    pub dst_port: Option<u16>,
    /// TCP flags byte (FIN=0x01, SYN=0x02, RST=0x04, PSH=0x08, ACK=0x10).
    pub tcp_flags: Option<u8>,
    /// TCP/UDP payload (without Ethernet padding); empty if none or unknown.
    pub payload: Vec<u8>,
    /// The whole frame as captured, starting at the Ethernet header.
    pub raw: Vec<u8>,
}

impl Frame {
    /// Decodes `raw` (an Ethernet frame). Never fails: undecodable layers
    /// leave their fields `None`.
    pub fn parse(raw: &[u8]) -> Frame {
        let mut f = Frame {
            raw: raw.to_vec(),
            ..Frame::default()
        };
        if raw.len() < ETH_HLEN {
            return f;
        }
        let mut ethertype = be16(raw, 12);
        let mut l3 = ETH_HLEN;
        if ethertype == ETHERTYPE_VLAN && raw.len() >= ETH_HLEN + 4 {
            ethertype = be16(raw, 16);
            l3 += 4;
        }
        f.ethertype = ethertype;
        let ip = &raw[l3..];
        let l4 = match ethertype {
            ETHERTYPE_IPV4 => parse_ipv4(ip, &mut f),
            ETHERTYPE_IPV6 => parse_ipv6(ip, &mut f),
            _ => None,
        };
        if let (Some(l4), Some(proto)) = (l4, f.proto) {
            parse_l4(l4, proto, &mut f);
        }
        f
    }

    /// `(src_port, dst_port)` if this is a TCP segment.
    pub fn tcp_ports(&self) -> Option<(u16, u16)> {
        match (self.proto, self.src_port, self.dst_port) {
            (Some(IPPROTO_TCP), Some(s), Some(d)) => Some((s, d)),
            _ => None,
        }
    }

    /// Whether `needle` occurs anywhere in the raw frame (headers included),
    /// e.g. to prove a plaintext marker never crossed an encrypted hop.
    pub fn contains(&self, needle: &[u8]) -> bool {
        contains(&self.raw, needle)
    }

    /// Whether the TCP segment has the SYN flag and not ACK (a connection
    /// attempt).
    pub fn is_tcp_syn(&self) -> bool {
        self.proto == Some(IPPROTO_TCP)
            && self
                .tcp_flags
                .is_some_and(|fl| fl & 0x02 != 0 && fl & 0x10 == 0)
    }
}

/// Fills IPv4 fields and returns the L4 bytes, or `None` for non-first
/// fragments (no L4 header) and malformed headers.
fn parse_ipv4<'a>(ip: &'a [u8], f: &mut Frame) -> Option<&'a [u8]> {
    if ip.len() < 20 || ip[0] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ihl < 20 || ip.len() < ihl {
        return None;
    }
    f.src = Some(Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]).into());
    f.dst = Some(Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]).into());
    f.proto = Some(ip[9]);
    // Trim Ethernet padding using the total length. A zero/short value
    // (seen on some offloaded super-packets) means "to the end".
    let total = usize::from(be16(ip, 2));
    let end = if total >= ihl {
        total.min(ip.len())
    } else {
        ip.len()
    };
    let frag_offset = be16(ip, 6) & 0x1fff;
    (frag_offset == 0).then(|| &ip[ihl..end])
}

/// Fills IPv6 fields and returns the bytes after the fixed header.
/// Extension headers are not walked: `proto` is then the extension type and
/// ports stay `None`, which is fine for the traffic tests generate.
fn parse_ipv6<'a>(ip: &'a [u8], f: &mut Frame) -> Option<&'a [u8]> {
    if ip.len() < 40 || ip[0] >> 4 != 6 {
        return None;
    }
    let addr = |at: usize| {
        let mut b = [0u8; 16];
        b.copy_from_slice(&ip[at..at + 16]);
        IpAddr::from(Ipv6Addr::from(b))
    };
    f.src = Some(addr(8));
    f.dst = Some(addr(24));
    f.proto = Some(ip[6]);
    let payload_len = usize::from(be16(ip, 4));
    let end = if payload_len == 0 {
        ip.len() // jumbogram / offloaded: take everything
    } else {
        (40 + payload_len).min(ip.len())
    };
    Some(&ip[40..end])
}

fn parse_l4(l4: &[u8], proto: u8, f: &mut Frame) {
    let header_len = match proto {
        IPPROTO_TCP if l4.len() >= 20 => {
            f.tcp_flags = Some(l4[13]);
            usize::from(l4[12] >> 4) * 4
        }
        IPPROTO_UDP if l4.len() >= 8 => 8,
        _ => return,
    };
    f.src_port = Some(be16(l4, 0));
    f.dst_port = Some(be16(l4, 2));
    if header_len >= 8 && header_len <= l4.len() {
        f.payload = l4[header_len..].to_vec();
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Substring search; an empty needle matches everything.
fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eth(ethertype: u16) -> Vec<u8> {
        let mut v = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01];
        v.extend_from_slice(&ethertype.to_be_bytes());
        v
    }

    fn ipv4(proto: u8, l4: &[u8]) -> Vec<u8> {
        let total = (20 + l4.len()) as u16;
        let mut v = vec![0x45, 0];
        v.extend_from_slice(&total.to_be_bytes());
        v.extend_from_slice(&[0, 1, 0x40, 0, 64, proto, 0, 0]); // id, DF, ttl, proto, csum
        v.extend_from_slice(&[10, 213, 1, 1, 10, 213, 1, 2]);
        v.extend_from_slice(l4);
        v
    }

    fn tcp(sport: u16, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&sport.to_be_bytes());
        v.extend_from_slice(&dport.to_be_bytes());
        v.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0]); // seq, ack
        v.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]); // doff=5
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn parses_ipv4_tcp_and_trims_padding() {
        let mut raw = eth(ETHERTYPE_IPV4);
        raw.extend(ipv4(IPPROTO_TCP, &tcp(40000, 15008, 0x18, b"hi")));
        raw.extend_from_slice(&[0; 12]); // Ethernet minimum-size padding
        let f = Frame::parse(&raw);
        assert_eq!(f.ethertype, ETHERTYPE_IPV4);
        assert_eq!(f.src, Some("10.213.1.1".parse().unwrap()));
        assert_eq!(f.dst, Some("10.213.1.2".parse().unwrap()));
        assert_eq!(f.proto, Some(IPPROTO_TCP));
        assert_eq!(f.tcp_ports(), Some((40000, 15008)));
        assert_eq!(f.tcp_flags, Some(0x18));
        assert_eq!(f.payload, b"hi");
        assert!(!f.is_tcp_syn());
        assert!(f.contains(b"hi"));
        assert!(f.contains(&[10, 213, 1, 2]));
        assert!(!f.contains(b"hello"));
        assert_eq!(f.raw, raw);
    }

    #[test]
    fn tcp_options_are_skipped() {
        let mut seg = tcp(1, 2, 0x02, &[]);
        seg[12] = 0x60; // doff=6: one 4-byte option word
        seg.extend_from_slice(&[1, 1, 1, 0]);
        seg.extend_from_slice(b"data");
        let mut raw = eth(ETHERTYPE_IPV4);
        raw.extend(ipv4(IPPROTO_TCP, &seg));
        let f = Frame::parse(&raw);
        assert_eq!(f.payload, b"data");
        assert!(f.is_tcp_syn());
    }

    #[test]
    fn parses_udp_over_vlan() {
        let mut udp = Vec::new();
        udp.extend_from_slice(&53u16.to_be_bytes());
        udp.extend_from_slice(&5353u16.to_be_bytes());
        udp.extend_from_slice(&[0, 11, 0, 0]);
        udp.extend_from_slice(b"dns");
        let mut raw = eth(ETHERTYPE_VLAN);
        raw.extend_from_slice(&[0, 7]); // TCI
        raw.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        raw.extend(ipv4(IPPROTO_UDP, &udp));
        let f = Frame::parse(&raw);
        assert_eq!(f.ethertype, ETHERTYPE_IPV4);
        assert_eq!(f.proto, Some(IPPROTO_UDP));
        assert_eq!((f.src_port, f.dst_port), (Some(53), Some(5353)));
        assert_eq!(f.tcp_ports(), None);
        assert_eq!(f.payload, b"dns");
    }

    #[test]
    fn parses_ipv6_tcp() {
        let seg = tcp(8080, 443, 0x10, b"v6");
        let mut raw = eth(ETHERTYPE_IPV6);
        raw.extend_from_slice(&[0x60, 0, 0, 0]);
        raw.extend_from_slice(&(seg.len() as u16).to_be_bytes());
        raw.extend_from_slice(&[IPPROTO_TCP, 64]);
        let src: Ipv6Addr = "fd00::1".parse().unwrap();
        let dst: Ipv6Addr = "fd00::2".parse().unwrap();
        raw.extend_from_slice(&src.octets());
        raw.extend_from_slice(&dst.octets());
        raw.extend(seg);
        let f = Frame::parse(&raw);
        assert_eq!(f.src, Some(src.into()));
        assert_eq!(f.dst, Some(dst.into()));
        assert_eq!(f.tcp_ports(), Some((8080, 443)));
        assert_eq!(f.payload, b"v6");
    }

    #[test]
    fn non_first_fragment_has_no_ports() {
        let mut ip = ipv4(IPPROTO_TCP, &tcp(1, 2, 0, b"xx"));
        ip[6..8].copy_from_slice(&0x0010u16.to_be_bytes()); // offset 16*8
        let mut raw = eth(ETHERTYPE_IPV4);
        raw.extend(ip);
        let f = Frame::parse(&raw);
        assert_eq!(f.proto, Some(IPPROTO_TCP));
        assert_eq!(f.tcp_ports(), None);
        assert!(f.payload.is_empty());
    }

    #[test]
    fn truncated_and_foreign_frames_do_not_panic() {
        for len in 0..60 {
            let mut raw = eth(ETHERTYPE_IPV4);
            raw.extend(ipv4(IPPROTO_TCP, &tcp(1, 2, 0, b"payload-bytes")));
            raw.truncate(len);
            let _ = Frame::parse(&raw);
        }
        let arp = Frame::parse(&[eth(0x0806), vec![0; 28]].concat());
        assert_eq!(arp.ethertype, 0x0806);
        assert_eq!(arp.proto, None);
        // Corrupt IHL below the minimum.
        let mut raw = eth(ETHERTYPE_IPV4);
        raw.extend(ipv4(IPPROTO_TCP, &tcp(1, 2, 0, b"")));
        raw[ETH_HLEN] = 0x42;
        assert_eq!(Frame::parse(&raw).src, None);
        assert!(Frame::parse(&raw).contains(b""));
    }
}
