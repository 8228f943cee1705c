//! The HBONE server side of the protocol: HTTP/2 settings for :15008 and CONNECT responses.
//! The listener that owns workloads and dials apps is `proxy::inbound`.

use bytes::Bytes;
use h2::server::{Connection, SendResponse};
use http::{Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};

use super::{
    CONNECTION_WINDOW, MAX_FRAME_SIZE, MAX_PENDING_RESETS, SERVER_MAX_HEADER_LIST,
    SERVER_MAX_STREAMS, STREAM_WINDOW,
};

/// Local stream errors tolerated before the connection is torn down with ENHANCE_YOUR_CALM
/// (reliability #8: invalid-frame floods must not grow memory).
const MAX_LOCAL_ERROR_RESETS: usize = 1024;

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
pub fn accept(mut respond: SendResponse<Bytes>) -> Result<h2::SendStream<Bytes>, h2::Error> {
    let resp = Response::builder()
        .status(StatusCode::OK)
        .body(())
        .expect("status-only response");
    respond.send_response(resp, false)
}
