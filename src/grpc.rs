//! gRPC plumbing shared by the xDS client, the CA client and the CA server: a TLS channel to a
//! control plane (roots from a file, re-read on every connect; the tunnel's socket mark so the
//! node's own capture never loops it), the `authorization`/`clusterid` headers, and a TLS
//! server whose unauthenticated peers are bounded (handshake deadline, connection cap).
//!
//! TLS here is rustls with the node's crypto provider, as on the data path; tonic's own TLS is
//! not used, so the two never disagree about versions or roots.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::Uri;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use zmesh_proto::tonic;
use zmesh_proto::tonic::metadata::MetadataValue;
use zmesh_proto::tonic::transport::{Channel, Endpoint};

use crate::config::control_plane::GrpcTarget;
use crate::identity::load_certs_pem;
use crate::socket::{dial, DialOptions};

/// TCP connect plus TLS handshake to a control plane.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum GrpcError {
    #[error("control plane address {address:?}: {reason}")]
    Address { address: String, reason: String },
    #[error("control plane roots {path}: {reason}")]
    Roots { path: String, reason: String },
    #[error("cannot reach {address}: {reason}")]
    Connect { address: String, reason: String },
    #[error("{0}")]
    Token(String),
}

/// Parses `https://host:port` (the port defaults to 443; `http` is refused: the control plane
/// is only ever reached over TLS).
pub fn parse_address(address: &str) -> Result<(String, u16), GrpcError> {
    let bad = |reason: &str| GrpcError::Address {
        address: address.to_string(),
        reason: reason.to_string(),
    };
    let uri: Uri = address.parse().map_err(|_| bad("not a URI"))?;
    if uri.scheme_str() != Some("https") {
        return Err(bad("must start with https:// (plaintext is never used)"));
    }
    let host = uri.host().ok_or_else(|| bad("no host"))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    Ok((host, uri.port_u16().unwrap_or(443)))
}

/// The TLS client config for `target`: its roots (read now), ALPN h2, no client certificate.
pub fn client_tls(
    target: &GrpcTarget,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<ClientConfig, GrpcError> {
    let roots_err = |reason: String| GrpcError::Roots {
        path: target.root_cert.display().to_string(),
        reason,
    };
    let mut roots = RootCertStore::empty();
    for c in load_certs_pem(&target.root_cert).map_err(|e| roots_err(e.to_string()))? {
        roots.add(c).map_err(|e| roots_err(e.to_string()))?;
    }
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| roots_err(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// Connects a gRPC channel to `target` now (so a failure is seen here, not on first use): DNS,
/// TCP with `mark`, TLS against the target's roots and name. Every call re-reads the roots.
pub async fn connect(target: &GrpcTarget, mark: Option<u32>) -> Result<Channel, GrpcError> {
    let (host, port) = parse_address(&target.address)?;
    let tls = Arc::new(client_tls(target, crate::tls::provider())?);
    let name = target.server_name.clone().unwrap_or_else(|| host.clone());
    let server_name = ServerName::try_from(name.clone()).map_err(|_| GrpcError::Address {
        address: target.address.clone(),
        reason: format!("{name:?} is not a valid TLS server name"),
    })?;
    let address = target.address.clone();
    // The URI only names the authority for HTTP/2; the connector decides where to go.
    let authority = if host.contains(':') {
        format!("http://[{host}]:{port}")
    } else {
        format!("http://{host}:{port}")
    };
    let connector = tower::service_fn(move |_: Uri| {
        let (host, tls, server_name) = (host.clone(), tls.clone(), server_name.clone());
        async move {
            let io = std::io::Error::other;
            let addr = resolve(&host, port).await?;
            let tcp = dial(
                addr,
                DialOptions {
                    mark,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| io(e.to_string()))?;
            let stream = tokio::time::timeout(
                CONNECT_TIMEOUT,
                TlsConnector::from(tls).connect(server_name, tcp),
            )
            .await
            .map_err(|_| io(format!("TLS handshake with {addr} timed out")))??;
            Ok::<_, std::io::Error>(TokioIo::new(stream))
        }
    });
    Endpoint::from_shared(authority)
        .map_err(|e| GrpcError::Address {
            address: address.clone(),
            reason: e.to_string(),
        })?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .connect_with_connector(connector)
        .await
        .map_err(|e| GrpcError::Connect {
            address,
            reason: error_chain(&e),
        })
}

async fn resolve(host: &str, port: u16) -> std::io::Result<SocketAddr> {
    tokio::net::lookup_host((host, port))
        .await?
        .next()
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{host} has no address"),
            )
        })
}

/// An error with its sources, for logs (tonic's Display stops at "transport error").
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}

/// Adds `authorization: Bearer <token>` (token read now) and `clusterid` to a request.
pub fn authorize<T>(req: &mut tonic::Request<T>, target: &GrpcTarget) -> Result<(), GrpcError> {
    let md = req.metadata_mut();
    if let Some(token) = target.token.read().map_err(GrpcError::Token)? {
        let v = MetadataValue::try_from(format!("Bearer {token}"))
            .map_err(|_| GrpcError::Token("the token is not a valid header value".into()))?;
        md.insert("authorization", v);
    }
    if let Ok(v) = MetadataValue::try_from(target.cluster_id.as_str()) {
        md.insert("clusterid", v);
    }
    Ok(())
}

/// The Bearer token of a request, if it carries one.
pub fn bearer<T>(req: &tonic::Request<T>) -> Option<&str> {
    req.metadata()
        .get("authorization")?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

/// Limits of a TLS gRPC server facing unauthenticated peers.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    /// TCP accept to the end of the TLS handshake.
    pub handshake_timeout: Duration,
    /// Connections open at once; beyond it, new ones are closed at accept.
    pub max_connections: usize,
    /// Connections open at once from one source address, so one host cannot take them all.
    pub max_per_source: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            handshake_timeout: Duration::from_secs(10),
            max_connections: 1024,
            max_per_source: 64,
        }
    }
}

/// A TLS stream counted against the server's connection cap until dropped.
pub struct Counted {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    _slot: Slot,
}

/// One open connection's place under both caps, given back on drop.
struct Slot {
    open: Arc<AtomicUsize>,
    by_source: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
    source: std::net::IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
        let mut m = self.by_source.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.source);
            }
        }
    }
}

impl tokio::io::AsyncRead for Counted {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Counted {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for Counted {
    type ConnectInfo = Option<SocketAddr>;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.get_ref().0.peer_addr().ok()
    }
}

/// Accepts TLS connections on `listener` and yields them to a tonic server
/// (`Server::serve_with_incoming`). Handshakes run concurrently, each under the deadline; at
/// the cap, new connections are closed at once. Never ends on its own.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    limits: ServerLimits,
) -> impl futures_util::Stream<Item = std::io::Result<Counted>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Counted>>(64);
    let open = Arc::new(AtomicUsize::new(0));
    let by_source = Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
    let refusals = crate::rejections::LogLimiter::new(
        crate::rejections::LOG_BURST,
        crate::rejections::LOG_WINDOW,
    );
    tokio::spawn(async move {
        let acceptor = TlsAcceptor::from(tls);
        loop {
            // The server is gone (its incoming stream dropped): close the listener too.
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = tx.closed() => return,
            };
            let (tcp, peer) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "control-plane accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if open.fetch_add(1, Ordering::AcqRel) >= limits.max_connections {
                open.fetch_sub(1, Ordering::AcqRel);
                if let Some(suppressed) = refusals.allow() {
                    tracing::warn!(%peer, cap = limits.max_connections, suppressed, "control-plane connection refused: at the connection cap");
                }
                continue;
            }
            let source = peer.ip().to_canonical();
            {
                let mut m = by_source.lock().unwrap_or_else(|e| e.into_inner());
                let n = m.entry(source).or_insert(0);
                if *n >= limits.max_per_source {
                    drop(m);
                    open.fetch_sub(1, Ordering::AcqRel);
                    if let Some(suppressed) = refusals.allow() {
                        tracing::warn!(%peer, cap = limits.max_per_source, suppressed, "control-plane connection refused: at the per-source cap");
                    }
                    continue;
                }
                *n += 1;
            }
            let slot = Slot {
                open: open.clone(),
                by_source: by_source.clone(),
                source,
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(inner)) => {
                        let _ = tx.send(Ok(Counted { inner, _slot: slot })).await;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "control-plane TLS handshake failed")
                    }
                    Err(_) => tracing::debug!(%peer, "control-plane TLS handshake timed out"),
                }
            });
        }
    });
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) })
}

/// A TLS server config presenting `cert_chain`/`key` (PEM files) with ALPN h2.
pub fn server_tls(cert: &Path, key: &Path) -> Result<ServerConfig, String> {
    let chain = load_certs_pem(cert).map_err(|e| e.to_string())?;
    let key = crate::identity::load_key_pem(key).map_err(|e| e.to_string())?;
    let mut cfg = ServerConfig::builder_with_provider(crate::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| e.to_string())?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}
