//! Workload identity: SPIFFE IDs, the certificates that prove them, and where those certificates
//! come from (the built-in file CA, or static files provisioned by Vault/cert-manager on VMs).

mod ca;
mod cert;
mod manager;
mod spiffe;

pub use ca::{FileCa, CA_CERT_FILE, CA_KEY_FILE, ROOT_CERT_FILE};
pub use cert::{load_certs_pem, load_key_pem, peer_identity, CertError};
pub use manager::{CertManager, CertSource, StaticCert, WorkloadCert};
pub use spiffe::{SpiffeError, SpiffeId};
