//! The HBONE server side of the protocol: HTTP/2 settings for :15008 and CONNECT responses.
//! The listener that owns workloads and dials apps is `proxy::inbound`.

use bytes::Bytes;
use h2::server::{Connection, SendResponse};
use http::{Response, StatusCode};
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::identity::{peer_identity, SpiffeId};

use super::{
    ALPN_H2, CONNECTION_WINDOW, MAX_FRAME_SIZE, MAX_PENDING_RESETS, SERVER_MAX_HEADER_LIST,
    SERVER_MAX_STREAMS, STREAM_WINDOW,
};

/// Local stream errors tolerated before the connection is torn down with ENHANCE_YOUR_CALM
/// (reliability #8: invalid-frame floods must not grow memory).
const MAX_LOCAL_ERROR_RESETS: usize = 1024;

/// An authenticated HBONE connection, ready to accept CONNECT streams.
pub struct Accepted<IO> {
    /// The client's SPIFFE identity (its certificate's single URI SAN).
    pub client: SpiffeId,
    /// The client's chain, kept to re-check it when CRLs change.
    pub chain: Vec<CertificateDer<'static>>,
    pub h2: Connection<TlsStream<IO>, Bytes>,
}

/// TLS (client certificate required, ALPN h2) plus the HTTP/2 preface, all within `deadline`:
/// a client that stalls anywhere in between (slowloris, reliability #28) is dropped at the
/// deadline and its socket closed.
pub async fn accept<IO: AsyncRead + AsyncWrite + Unpin>(
    io: IO,
    cfg: Arc<ServerConfig>,
    deadline: Duration,
) -> Result<Accepted<IO>, String> {
    let handshake = async {
        let tls = TlsAcceptor::from(cfg)
            .accept(io)
            .await
            .map_err(|e| format!("TLS handshake failed: {e}"))?;
        let (_, conn) = tls.get_ref();
        if conn.alpn_protocol() != Some(ALPN_H2) {
            return Err("client did not negotiate ALPN h2".to_string());
        }
        let chain = conn
            .peer_certificates()
            .map(|c| c.to_vec())
            .unwrap_or_default();
        let client = chain
            .first()
            .ok_or("client presented no certificate")
            .and_then(|c| peer_identity(c).map_err(|_| "client certificate has no SPIFFE identity"))
            .map_err(str::to_string)?;
        let h2 = handshake(tls)
            .await
            .map_err(|e| format!("HTTP/2 preface failed: {e}"))?;
        Ok(Accepted { client, chain, h2 })
    };
    tokio::time::timeout(deadline, handshake)
        .await
        .map_err(|_| format!("TLS + HTTP/2 handshake not done within {deadline:?}"))?
}

/// Runs the HTTP/2 server handshake (reads the client preface) with HBONE's settings.
pub async fn handshake<T: AsyncRead + AsyncWrite + Unpin>(
    io: T,
) -> Result<Connection<T, Bytes>, h2::Error> {
    h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_concurrent_streams(SERVER_MAX_STREAMS)
        .max_header_list_size(SERVER_MAX_HEADER_LIST)
        .max_pending_accept_reset_streams(MAX_PENDING_RESETS)
        .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS))
        .handshake(io)
        .await
}

/// Answers a CONNECT with an error status; the response ends the stream (END_STREAM).
pub fn refuse(mut respond: SendResponse<Bytes>, status: StatusCode) {
    let resp = Response::builder()
        .status(status)
        .body(())
        .expect("status-only response");
    let _ = respond.send_response(resp, true);
}

/// Answers a CONNECT with 200 and returns the stream to send tunnel bytes on.
pub fn respond_ok(mut respond: SendResponse<Bytes>) -> Result<h2::SendStream<Bytes>, h2::Error> {
    let resp = Response::builder()
        .status(StatusCode::OK)
        .body(())
        .expect("status-only response");
    respond.send_response(resp, false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{CertManager, CertSource, FileCa};
    use tokio::io::duplex;

    fn certs(dir: &std::path::Path) -> CertManager {
        FileCa::init(dir, "cluster.local").unwrap();
        let ca = FileCa::load(dir).unwrap();
        let roots = ca.roots().to_vec();
        CertManager::new(
            CertSource::file_ca(ca, Duration::from_secs(3600)),
            &roots,
            crate::tls::provider(),
        )
        .unwrap()
    }

    /// A server config for `ns/server` and a client config for `ns/client`, from one CA.
    fn configs(dir: &std::path::Path) -> (Arc<ServerConfig>, rustls::ClientConfig, SpiffeId) {
        let m = certs(dir);
        let server_id = SpiffeId::new("cluster.local", "ns", "server").unwrap();
        let client_id = SpiffeId::new("cluster.local", "ns", "client").unwrap();
        let scfg =
            Arc::new(crate::tls::server_config(&m.fetch(&server_id).unwrap(), &m.trust()).unwrap());
        let ccfg =
            crate::tls::client_config(&m.fetch(&client_id).unwrap(), &m.trust(), vec![server_id])
                .unwrap();
        (scfg, ccfg, client_id)
    }

    /// reliability #28 with paused time: a client that never sends its ClientHello is dropped
    /// exactly at the deadline, and a well-behaved client connecting meanwhile is served.
    #[tokio::test(start_paused = true)]
    async fn slowloris_is_closed_at_the_deadline_while_a_normal_client_is_served() {
        let dir = tempfile::tempdir().unwrap();
        let (scfg, ccfg, client_id) = configs(dir.path());
        let deadline = Duration::from_secs(10);
        let start = tokio::time::Instant::now();

        // The slowloris: its end of the pipe is held open and never written.
        let (_stalled_client, stalled_server) = duplex(64 * 1024);
        let slow = tokio::spawn(accept(stalled_server, scfg.clone(), deadline));

        let (good_client, good_server) = duplex(64 * 1024);
        let good = tokio::spawn(accept(good_server, scfg, deadline));
        let tls = tokio_rustls::TlsConnector::from(Arc::new(ccfg))
            .connect(crate::tls::placeholder_server_name(), good_client)
            .await
            .unwrap();
        let (_send, conn) = h2::client::handshake(tls).await.unwrap();
        tokio::spawn(conn);
        let served = good.await.unwrap().expect("normal client served");
        assert_eq!(served.client, client_id);
        assert!(start.elapsed() < deadline, "served before the deadline");

        let err = match slow.await.unwrap() {
            Ok(_) => panic!("a client that never spoke was accepted"),
            Err(e) => e,
        };
        assert!(err.contains("not done within 10s"), "{err}");
        assert_eq!(start.elapsed(), deadline, "closed exactly at the deadline");
    }

    /// A client that completes TLS but never sends the HTTP/2 preface is dropped too.
    #[tokio::test(start_paused = true)]
    async fn a_missing_http2_preface_hits_the_same_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let (scfg, ccfg, _) = configs(dir.path());
        let deadline = Duration::from_secs(3);
        let start = tokio::time::Instant::now();
        let (c, s) = duplex(64 * 1024);
        let server = tokio::spawn(accept(s, scfg, deadline));
        let _tls = tokio_rustls::TlsConnector::from(Arc::new(ccfg))
            .connect(crate::tls::placeholder_server_name(), c)
            .await
            .unwrap();
        let err = match server.await.unwrap() {
            Ok(_) => panic!("accepted without an HTTP/2 preface"),
            Err(e) => e,
        };
        assert!(err.contains("not done within 3s"), "{err}");
        assert_eq!(start.elapsed(), deadline);
    }
}
