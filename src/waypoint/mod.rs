//! The waypoint: an L7 proxy that receives HBONE, applies HTTP routing and policy, and sends
//! each request onward over HBONE under its own identity (docs/waypoint.md).
//!
//! `config` is its part of the config file, `l7` the pure routing and authorization decisions,
//! `jwt` request authentication, `sandwich` its opt-in PROXY-protocol listener behind a node
//! tunnel. `server` is the running waypoint and the entry to its data path: `listener` (HBONE
//! accept and CONNECT admission), `flow` (what every admitted flow shares: the sniffer),
//! `request` (HTTP, L7), `upstream` (backends, retries, upstream connections), `tcp` (the
//! opaque relay), `state` (`WpState`, built from config), `accesslog` (the access line), `transcode`
//! (gRPC↔JSON transcoding).

pub mod accesslog;
pub mod config;
mod flow;
pub mod jwt;
pub mod l7;
mod listener;
pub mod metrics;
mod request;
pub mod resilience;
pub mod sandwich;
pub mod server;
mod state;
mod tcp;
pub mod transcode;
mod upstream;
