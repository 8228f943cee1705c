//! The waypoint: an L7 proxy that receives HBONE, applies HTTP routing and policy, and sends
//! each request onward over HBONE under its own identity (docs/waypoint.md).
//!
//! `config` is its part of the config file, `l7` the pure routing and authorization decisions,
//! `jwt` request authentication, `server` the data path, `sandwich` its opt-in PROXY-protocol
//! listener behind a node tunnel.

pub mod accesslog;
pub mod config;
pub mod jwt;
pub mod l7;
pub mod metrics;
pub mod resilience;
pub mod sandwich;
pub mod server;
