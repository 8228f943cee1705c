//! Workload identity: SPIFFE IDs, the certificates that prove them, and where those certificates
//! come from (the built-in file CA, or static files provisioned by Vault/cert-manager on VMs).

mod ca;
pub mod caclient;
mod cert;
pub mod csr;
mod manager;
mod spiffe;
mod trust;

pub use ca::{CaError, FileCa, Issued, SignedLeaf, CA_CERT_FILE, CA_KEY_FILE, ROOT_CERT_FILE};
pub use cert::{load_certs_pem, load_key_pem, peer_identity, CertError};
pub use csr::{check_csr, CheckedCsr, CsrError, MAX_CSR_BYTES};
pub use manager::{
    retry_backoff, Authority, CertManager, CertManagerError, CertSource, StaticCert, WorkloadCert,
};
pub use spiffe::{SpiffeError, SpiffeId};
pub(crate) use trust::RustlsTime;
pub use trust::{load_crls, unix_time, Clock, ManualClock, SystemClock, Trust, TrustError, Usage};
