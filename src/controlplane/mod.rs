//! The control-plane side zmesh can run itself, for a mesh without istiod: the xDS server that
//! feeds node tunnels the mesh file ([`xds_server`]).

pub mod xds_server;
