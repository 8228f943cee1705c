//! Forwarding a query the mesh cannot answer to the client's upstream resolvers: UDP first,
//! with a deadline per resolver; an answer with TC set is asked again over TCP (RFC 7766). The
//! query goes out unchanged (its id, flags and EDNS), from a fresh socket with a random port,
//! made in the client's namespace (in-pod) and carrying the tunnel's mark so the capture rules
//! never send it back to us.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;

use super::DnsMetrics;
use crate::netns::PodNetns;
use crate::socket::{dial_in, DialOptions};

/// The largest DNS message: what a TCP length prefix can say, and what a UDP read takes.
pub const MAX_MESSAGE: usize = 65535;

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("no upstream resolver: set node.dns.upstreams, or give {0} a nameserver line")]
    NoUpstream(String),
    #[error("every upstream resolver failed; last: {0}")]
    AllFailed(String),
}

/// The `nameserver` addresses of a resolv.conf, port 53 (scope ids of IPv6 link-local
/// addresses are not supported and such lines are skipped).
pub fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next()? == "nameserver")
                .then(|| words.next()?.parse::<IpAddr>().ok())
                .flatten()
        })
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// The resolvers one DNS listener forwards to.
pub struct Upstream {
    servers: Vec<SocketAddr>,
    /// Where the servers came from, for the error when there are none.
    origin: String,
    timeout: Duration,
    netns: Option<Arc<PodNetns>>,
    mark: Option<u32>,
}

impl Upstream {
    /// `servers` less any that is the proxy itself (`own`, or a loopback or unspecified address
    /// on its port): forwarding to ourselves would loop every unknown name until it timed out.
    pub fn new(
        servers: Vec<SocketAddr>,
        origin: String,
        own: SocketAddr,
        timeout: Duration,
        netns: Option<Arc<PodNetns>>,
        mark: Option<u32>,
    ) -> Upstream {
        let servers = servers
            .into_iter()
            .filter(|s| {
                let me = *s == own
                    || (s.port() == own.port()
                        && (s.ip().is_loopback() || s.ip().is_unspecified()));
                if me {
                    tracing::warn!(upstream = %s, "DNS upstream is the proxy itself; ignored (it would loop)");
                }
                !me
            })
            .collect();
        Upstream {
            servers,
            origin,
            timeout,
            netns,
            mark,
        }
    }

    pub fn servers(&self) -> &[SocketAddr] {
        &self.servers
    }

    /// The first answer any resolver gives for `query`, in order; each attempt and each
    /// failure is counted.
    pub async fn forward(
        &self,
        query: &[u8],
        metrics: &DnsMetrics,
    ) -> Result<Vec<u8>, ForwardError> {
        if self.servers.is_empty() {
            metrics.upstream_failure("none");
            return Err(ForwardError::NoUpstream(self.origin.clone()));
        }
        let mut last = String::new();
        for &server in &self.servers {
            let started = tokio::time::Instant::now();
            metrics.upstream_request("udp");
            let udp = tokio::time::timeout(self.timeout, self.udp(server, query)).await;
            let answer = match udp {
                Ok(Ok(a)) if truncated(&a) => {
                    metrics.upstream_request("tcp");
                    match tokio::time::timeout(self.timeout, self.tcp(server, query)).await {
                        Ok(Ok(a)) => Ok(a),
                        Ok(Err(e)) => Err(("tcp", format!("{server} over TCP: {e}"))),
                        Err(_) => Err((
                            "tcp",
                            format!("{server} over TCP: no answer in {:?}", self.timeout),
                        )),
                    }
                }
                Ok(Ok(a)) => Ok(a),
                Ok(Err(e)) => Err(("udp", format!("{server}: {e}"))),
                Err(_) => Err(("udp", format!("{server}: no answer in {:?}", self.timeout))),
            };
            metrics.upstream_duration(started.elapsed());
            match answer {
                Ok(a) => return Ok(a),
                Err((proto, e)) => {
                    metrics.upstream_failure(proto);
                    tracing::debug!(error = %e, "DNS upstream failed");
                    last = e;
                }
            }
        }
        Err(ForwardError::AllFailed(last))
    }

    async fn udp(&self, server: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
        let domain = Domain::for_address(server);
        let new = move || Socket::new(domain, Type::DGRAM, Some(Protocol::UDP));
        let socket = match &self.netns {
            Some(ns) => ns.run_async(new).await?,
            None => new()?,
        };
        if let Some(mark) = self.mark {
            socket.set_mark(mark)?;
        }
        socket.set_nonblocking(true)?;
        let any: SocketAddr = match server {
            SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        socket.bind(&any.into())?;
        let socket = UdpSocket::from_std(socket.into())?;
        // Connected: the kernel drops datagrams from anyone but the server.
        socket.connect(server).await?;
        socket.send(query).await?;
        let mut buf = vec![0u8; MAX_MESSAGE];
        loop {
            let n = socket.recv(&mut buf).await?;
            // A datagram that is not the answer to this query (a late answer to an earlier
            // one, a spoof) is skipped; the deadline bounds the wait.
            if is_answer_to(&buf[..n], query) {
                buf.truncate(n);
                return Ok(buf);
            }
        }
    }

    async fn tcp(&self, server: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
        let opts = DialOptions {
            mark: self.mark,
            ..Default::default()
        };
        let mut s = dial_in(self.netns.as_deref(), server, opts)
            .await
            .map_err(std::io::Error::other)?;
        let len = u16::try_from(query.len()).map_err(std::io::Error::other)?;
        let mut framed = Vec::with_capacity(query.len() + 2);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(query);
        s.write_all(&framed).await?;
        let n = usize::from(s.read_u16().await?);
        let mut buf = vec![0u8; n];
        s.read_exact(&mut buf).await?;
        if !is_answer_to(&buf, query) {
            return Err(std::io::Error::other(
                "answer over TCP is not for our query",
            ));
        }
        Ok(buf)
    }
}

/// Whether `msg` is a response (QR set) to `query`: the same id and the same question
/// (names compared ASCII case-insensitively), so a spoof must guess the name as well as the id.
fn is_answer_to(msg: &[u8], query: &[u8]) -> bool {
    msg.len() >= 12
        && query.len() >= 12
        && msg[0..2] == query[0..2]
        && msg[2] & 0x80 != 0
        && match (question(msg), question(query)) {
            (Some(a), Some(q)) => a.eq_ignore_ascii_case(q),
            _ => false,
        }
}

/// The question section of a message: its count (bytes 4-5) and its one question's bytes (an
/// uncompressed name, type and class). None when it cannot be read that way.
fn question(msg: &[u8]) -> Option<&[u8]> {
    let count = u16::from_be_bytes([*msg.get(4)?, *msg.get(5)?]);
    match count {
        0 => Some(&msg[4..6]),
        1 => {
            let mut i = 12;
            loop {
                let len = usize::from(*msg.get(i)?);
                i += 1;
                if len == 0 {
                    break;
                }
                // The first name of a message has nothing before it to point at.
                if len & 0xC0 != 0 {
                    return None;
                }
                i += len;
            }
            let end = i + 4;
            (end <= msg.len()).then(|| &msg[12..end])
        }
        _ => None,
    }
}

/// Whether the TC bit of a response is set.
fn truncated(msg: &[u8]) -> bool {
    msg.len() >= 12 && msg[2] & 0x02 != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_nameservers_are_read_and_junk_skipped() {
        let text = "# generated\nsearch shop.svc.cluster.local svc.cluster.local\nnameserver 10.96.0.10\nnameserver fd00::a\nnameserver fe80::1%eth0\nnameserver\noptions ndots:5\n nameserver 1.1.1.1\n";
        assert_eq!(
            parse_resolv_conf(text),
            [
                "10.96.0.10:53".parse::<SocketAddr>().unwrap(),
                "[fd00::a]:53".parse().unwrap(),
                "1.1.1.1:53".parse().unwrap(),
            ]
        );
    }

    #[test]
    fn the_proxy_never_forwards_to_itself() {
        let own: SocketAddr = "127.0.0.1:15053".parse().unwrap();
        let u = Upstream::new(
            vec![
                own,
                "0.0.0.0:15053".parse().unwrap(),
                "[::1]:15053".parse().unwrap(),
                "127.0.0.53:53".parse().unwrap(),
                "10.0.0.1:15053".parse().unwrap(),
            ],
            "test".into(),
            own,
            Duration::from_secs(1),
            None,
            None,
        );
        assert_eq!(
            u.servers(),
            [
                "127.0.0.53:53".parse::<SocketAddr>().unwrap(),
                "10.0.0.1:15053".parse().unwrap()
            ]
        );
    }

    #[test]
    fn answers_are_matched_by_id_qr_and_question() {
        let mut h = [0u8; 12];
        h[0..2].copy_from_slice(&7u16.to_be_bytes());
        let q7 = h;
        let mut q8 = h;
        q8[0..2].copy_from_slice(&8u16.to_be_bytes());
        assert!(!is_answer_to(&h, &q7), "a query is not an answer");
        h[2] = 0x80;
        assert!(is_answer_to(&h, &q7));
        assert!(!is_answer_to(&h, &q8));
        assert!(!is_answer_to(&h[..11], &q7), "short header");
        // One question: the answer must repeat it (case aside).
        let with_q = |hdr: [u8; 12], name: &[u8]| {
            let mut m = hdr.to_vec();
            m[5] = 1;
            m.extend_from_slice(name);
            m.extend_from_slice(&[0, 1, 0, 1]);
            m
        };
        let query = with_q(q7, b"\x03api\x07example\x03com\x00");
        assert!(is_answer_to(
            &with_q(h, b"\x03API\x07example\x03com\x00"),
            &query
        ));
        assert!(!is_answer_to(
            &with_q(h, b"\x03bad\x07example\x03com\x00"),
            &query
        ));
        assert!(!is_answer_to(&h, &query), "no question in the answer");
        assert!(!is_answer_to(&with_q(h, b"\xc0\x0c"), &query), "compressed");
        let mut cut = with_q(h, b"\x03api\x07example\x03com\x00");
        cut.truncate(cut.len() - 2);
        assert!(!is_answer_to(&cut, &query), "cut short");
        assert!(!truncated(&h));
        h[2] |= 0x02;
        assert!(truncated(&h));
    }

    #[tokio::test]
    async fn no_upstream_is_a_counted_failure_naming_the_fix() {
        let m = DnsMetrics::default();
        let own: SocketAddr = "127.0.0.1:15053".parse().unwrap();
        let u = Upstream::new(
            vec![],
            "/etc/resolv.conf".into(),
            own,
            Duration::from_secs(1),
            None,
            None,
        );
        let e = u.forward(&[0; 12], &m).await.unwrap_err().to_string();
        assert!(e.contains("node.dns.upstreams"), "{e}");
        assert_eq!(m.upstream_failures_total(), 1);
    }

    /// A resolver that never answers: the deadline (paused time) fails it and the next one
    /// answers; both attempts are counted.
    #[tokio::test(start_paused = true)]
    async fn a_silent_resolver_times_out_and_the_next_answers() {
        let m = DnsMetrics::default();
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let good = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let good_addr = good.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            let (n, from) = good.recv_from(&mut buf).await.unwrap();
            buf[2] |= 0x80;
            good.send_to(&buf[..n], from).await.unwrap();
        });
        let own: SocketAddr = "127.0.0.1:15053".parse().unwrap();
        let u = Upstream::new(
            vec![silent.local_addr().unwrap(), good_addr],
            "test".into(),
            own,
            Duration::from_secs(2),
            None,
            None,
        );
        let mut q = [0u8; 12];
        q[0..2].copy_from_slice(&9u16.to_be_bytes());
        let a = u.forward(&q, &m).await.unwrap();
        assert!(is_answer_to(&a, &q));
        assert_eq!(m.upstream_requests_total(), 2);
        assert_eq!(m.upstream_failures_total(), 1);
    }
}
