//! The control plane of a standalone mesh (`zmesh-node ca serve`): a CA server that signs the
//! nodes' CSRs, so no node holds the CA key, with more gRPC services able to share the same
//! listener, TLS identity and mesh model.
//!
//! One process owns the mesh model, read from a zmesh config file (`Config::load`'s schema,
//! its `workloads` say which node runs which identity) and re-read when it changes; every
//! service reads it from one `watch` channel ([`ControlPlane::mesh`]). The listener is TLS
//! only, with the handshake deadline and connection cap of [`grpc::incoming`]; its certificate
//! is issued at start by the CA itself for [`DEFAULT_SERVER_NAME`] (plus any names given), with
//! a key that lives in memory only and is replaced at half-life.
//!
//! Adding a service: build it from [`ControlPlane::mesh`] and add it to the router that
//! [`ControlPlane::router`] returns before [`ControlPlane::serve`] (see [`serve`]).

pub mod ca_server;
pub mod tokens;
pub mod xds_server;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use zmesh_proto::tonic::transport::server::Router;
use zmesh_proto::tonic::transport::Server;

use crate::config::{Config, ConfigError};
use crate::grpc::{self, ServerLimits};
use crate::identity::{CaError, Clock, FileCa, SystemClock};
use ca_server::CaServer;
use tokens::{NodeTokens, TokenError};

/// The DNS name the server's certificate always carries; nodes set it as `server_name` when
/// they reach the server by IP.
pub const DEFAULT_SERVER_NAME: &str = "zmesh-ca";
/// istiod's port for the CA and xDS, so node configs look the same against either.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:15012";
/// The serving certificate's lifetime; it is replaced at half of it, on a handshake.
const SERVER_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
/// One gRPC call, signing included (a signature takes well under a millisecond).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Calls in flight on one connection: a node asks for a handful of identities at start.
const CALLS_PER_CONNECTION: usize = 32;
/// Request headers: a token and a few short ones.
const MAX_HEADER_LIST: u32 = 16 * 1024;
/// HTTP/2 flow-control window per stream: what a peer may have buffered here unread.
const STREAM_WINDOW: u32 = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("CA: {0}")]
    Ca(#[from] CaError),
    #[error("node tokens: {0}")]
    Tokens(#[from] TokenError),
    #[error("mesh model: {0}")]
    Mesh(#[from] ConfigError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("serving TLS: {0}")]
    Tls(String),
    #[error("gRPC server: {0}")]
    Serve(String),
}

/// What `zmesh-node ca serve` is given.
pub struct ServeOptions {
    /// The CA directory (`ca init`), holding the key and the node token store.
    pub ca_dir: PathBuf,
    /// The mesh model.
    pub mesh: PathBuf,
    pub listen: SocketAddr,
    /// DNS names of the serving certificate besides [`DEFAULT_SERVER_NAME`].
    pub server_names: Vec<String>,
    pub limits: ServerLimits,
    /// How often the mesh file is checked for changes.
    pub reload_interval: Duration,
    /// Notified to re-read the mesh file now (SIGHUP).
    pub reload_now: Arc<Notify>,
    /// Signing and certificate-rotation time.
    pub clock: Arc<dyn Clock>,
    /// Also serve the mesh over xDS (delta ADS), to nodes authenticated by their token.
    pub xds: bool,
}

impl ServeOptions {
    pub fn new(ca_dir: PathBuf, mesh: PathBuf, listen: SocketAddr) -> ServeOptions {
        ServeOptions {
            ca_dir,
            mesh,
            listen,
            server_names: Vec::new(),
            limits: ServerLimits::default(),
            reload_interval: crate::proxy::reload::WATCH_INTERVAL,
            reload_now: Arc::new(Notify::new()),
            clock: Arc::new(SystemClock),
            xds: false,
        }
    }
}

/// A bound, not yet serving control plane.
pub struct ControlPlane {
    listener: TcpListener,
    local_addr: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    limits: ServerLimits,
    mesh: watch::Receiver<Arc<Config>>,
    ca: Arc<FileCa>,
    tokens: Arc<NodeTokens>,
    clock: Arc<dyn Clock>,
    xds: bool,
    watcher: Aborting,
}

/// Stops the mesh watcher with the server.
struct Aborting(tokio::task::JoinHandle<()>);

impl Drop for Aborting {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl ControlPlane {
    /// Loads the CA, the token store and the mesh model (any of them broken stops here, before
    /// serving), issues the serving certificate and binds the listener.
    pub async fn bind(opts: ServeOptions) -> Result<ControlPlane, ServeError> {
        let ca = Arc::new(FileCa::load(&opts.ca_dir)?);
        let tokens = Arc::new(NodeTokens::new(&opts.ca_dir));
        if tokens.check()? == 0 {
            tracing::warn!(
                dir = %opts.ca_dir.display(),
                "no node tokens yet: every call is refused until `zmesh-node ca token` makes one"
            );
        }
        let loaded = crate::proxy::reload::stamp(&opts.mesh);
        let cfg = Config::load(&opts.mesh)?;
        let (tx, mesh) = watch::channel(Arc::new(cfg.clone()));
        let watcher = Aborting(tokio::spawn(watch_mesh(
            opts.mesh.clone(),
            cfg,
            loaded,
            tx,
            opts.reload_interval,
            opts.reload_now.clone(),
        )));
        let mut names = vec![DEFAULT_SERVER_NAME.to_string()];
        for n in opts.server_names {
            if !names.contains(&n) {
                names.push(n);
            }
        }
        let tls = Arc::new(server_tls(ServingCert::new(
            ca.clone(),
            names,
            opts.clock.clone(),
        )?)?);
        let listener = TcpListener::bind(opts.listen)
            .await
            .map_err(|source| ServeError::Bind {
                addr: opts.listen,
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| ServeError::Bind {
            addr: opts.listen,
            source,
        })?;
        Ok(ControlPlane {
            listener,
            local_addr,
            tls,
            limits: opts.limits,
            mesh,
            ca,
            tokens,
            clock: opts.clock,
            xds: opts.xds,
            watcher,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The mesh model, current and future: what every service of this server reads.
    pub fn mesh(&self) -> watch::Receiver<Arc<Config>> {
        self.mesh.clone()
    }

    /// The CA service alone (for a router built elsewhere).
    pub fn ca_service(
        &self,
    ) -> zmesh_proto::istio::v1::auth::istio_certificate_service_server::IstioCertificateServiceServer<CaServer>
    {
        CaServer::new(
            self.ca.clone(),
            self.tokens.clone(),
            self.mesh(),
            self.clock.clone(),
        )
        .into_service()
    }

    /// A gRPC server with this process's limits and the CA service. This is the one place
    /// services are added (the binary and [`serve`] both come through it): a second service,
    /// such as xDS built from [`ControlPlane::mesh`], is chained here with `.add_service(..)`.
    pub fn router(&self) -> Router {
        // The call deadline covers a call until its response starts: a whole CSR call, and an
        // xDS stream only until it is open (its responses then flow for as long as it lives).
        // Streams per connection, header size and flow-control windows are bounded, so a peer
        // that has not authenticated cannot hold much of the server per connection.
        let router = Server::builder()
            .timeout(CALL_TIMEOUT)
            .concurrency_limit_per_connection(CALLS_PER_CONNECTION)
            .max_concurrent_streams(CALLS_PER_CONNECTION as u32)
            .http2_max_header_list_size(MAX_HEADER_LIST)
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(STREAM_WINDOW * 4)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .add_service(self.authenticated(self.ca_service()));
        if self.xds {
            router.add_service(self.authenticated(xds_server::service(self.mesh())))
        } else {
            router
        }
    }

    /// `svc` behind the node-token check, made on the request's headers before its body is
    /// read: a stranger's call costs no decoding. Refusals are counted in the log through a
    /// rate limit, so a flood of them cannot flood it.
    // tonic's interceptors return its (large) `Status` by value.
    #[allow(clippy::result_large_err)]
    pub fn authenticated<S>(
        &self,
        svc: S,
    ) -> zmesh_proto::tonic::service::interceptor::InterceptedService<
        S,
        impl zmesh_proto::tonic::service::Interceptor + Clone,
    > {
        let tokens = self.tokens.clone();
        let limiter = Arc::new(crate::rejections::LogLimiter::new(
            crate::rejections::LOG_BURST,
            crate::rejections::LOG_WINDOW,
        ));
        let check = move |mut req: zmesh_proto::tonic::Request<()>| match tokens::caller_node(
            &tokens, &req,
        ) {
            Ok(node) => {
                // The xDS service registers VMs on the node the token belongs to, never on
                // one a client names.
                req.extensions_mut().insert(xds_server::CallerNode(node));
                Ok(req)
            }
            Err((code, why)) => {
                if let Some(suppressed) = limiter.allow() {
                    tracing::warn!(reason = why, suppressed, "control-plane call refused");
                }
                Err(zmesh_proto::tonic::Status::new(code, why))
            }
        };
        zmesh_proto::tonic::service::interceptor::InterceptedService::new(svc, check)
    }

    /// Serves `router` on the bound listener until `shutdown` completes.
    pub async fn serve(
        self,
        router: Router,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServeError> {
        let ControlPlane {
            listener,
            tls,
            limits,
            watcher,
            local_addr,
            ..
        } = self;
        tracing::info!(%local_addr, "control plane serving");
        let result = router
            .serve_with_incoming_shutdown(grpc::incoming(listener, tls, limits), shutdown)
            .await
            .map_err(|e| ServeError::Serve(grpc::error_chain(&e)));
        drop(watcher);
        result
    }
}

/// Binds and serves everything this process serves until `shutdown`.
pub async fn serve(
    opts: ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let cp = ControlPlane::bind(opts).await?;
    let router = cp.router();
    cp.serve(router, shutdown).await
}

/// Keeps `tx` at the last good mesh model from `path`. A broken file is logged and ignored:
/// the last good model keeps being served.
async fn watch_mesh(
    path: PathBuf,
    cfg: Config,
    loaded: crate::proxy::reload::Stamp,
    tx: watch::Sender<Arc<Config>>,
    interval: Duration,
    now: Arc<Notify>,
) {
    let tx = Arc::new(tx);
    let reload = move |p: &Path| match Config::load(p) {
        Ok(cfg) => {
            tracing::info!(
                workloads = cfg.workloads.len(),
                "mesh model reloaded from {}",
                p.display()
            );
            tx.send_replace(Arc::new(cfg.clone()));
            Some(cfg)
        }
        Err(e) => {
            tracing::error!(error = %e, "mesh model reload rejected; the last good model stays");
            None
        }
    };
    crate::proxy::reload::watch_files(path, &cfg, loaded, interval, now, reload, || {}).await
}

/// The serving certificate: issued by the CA for `names`, replaced on the first handshake past
/// half its life. A failed re-issue keeps the current one (and is logged).
#[derive(Debug)]
struct ServingCert {
    ca: Arc<FileCa>,
    names: Vec<String>,
    clock: Arc<dyn Clock>,
    current: RwLock<(SystemTime, Arc<CertifiedKey>)>,
}

impl ServingCert {
    fn new(ca: Arc<FileCa>, names: Vec<String>, clock: Arc<dyn Clock>) -> Result<Self, ServeError> {
        let current = issue_serving(&ca, &names, clock.now())?;
        Ok(ServingCert {
            ca,
            names,
            clock,
            current: RwLock::new(current),
        })
    }
}

fn issue_serving(
    ca: &FileCa,
    names: &[String],
    now: SystemTime,
) -> Result<(SystemTime, Arc<CertifiedKey>), ServeError> {
    let issued = ca.issue_server_at(names, SERVER_CERT_TTL, now)?;
    let key = crate::tls::provider()
        .key_provider
        .load_private_key(issued.key)
        .map_err(|e| ServeError::Tls(e.to_string()))?;
    Ok((
        now + SERVER_CERT_TTL / 2,
        Arc::new(CertifiedKey::new(issued.chain, key)),
    ))
}

impl ServingCert {
    /// The certificate to present now, re-issued first when past half its life.
    fn current(&self) -> Arc<CertifiedKey> {
        let now = self.clock.now();
        let (refresh_at, cert) = self.current.read().expect("poisoned").clone();
        if now < refresh_at {
            return cert;
        }
        match issue_serving(&self.ca, &self.names, now) {
            Ok(fresh) => {
                let cert = fresh.1.clone();
                *self.current.write().expect("poisoned") = fresh;
                tracing::info!("control-plane serving certificate renewed");
                cert
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot renew the control-plane serving certificate; keeping the current one");
                cert
            }
        }
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

fn server_tls(cert: ServingCert) -> Result<rustls::ServerConfig, ServeError> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| ServeError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(cert));
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::ManualClock;

    #[test]
    fn the_serving_certificate_names_the_server_and_is_replaced_at_half_life() {
        let dir = tempfile::tempdir().unwrap();
        FileCa::init(dir.path(), "cluster.local").unwrap();
        let ca = Arc::new(FileCa::load(dir.path()).unwrap());
        let clock = ManualClock::new();
        let names = vec![DEFAULT_SERVER_NAME.to_string(), "ca.example".to_string()];
        let serving = ServingCert::new(ca, names, clock.clone()).unwrap();
        let first = serving.current();
        let (_, leaf) = x509_parser::parse_x509_certificate(&first.cert[0]).unwrap();
        let sans: Vec<String> = leaf
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(sans, ["DNSName(zmesh-ca)", "DNSName(ca.example)"]);
        clock.advance(SERVER_CERT_TTL / 4);
        assert!(
            Arc::ptr_eq(&first, &serving.current()),
            "kept before half-life"
        );
        clock.advance(SERVER_CERT_TTL / 4 + Duration::from_secs(1));
        let second = serving.current();
        assert!(!Arc::ptr_eq(&first, &second), "re-issued past half-life");
        assert_ne!(first.cert[0], second.cert[0]);
    }
}
