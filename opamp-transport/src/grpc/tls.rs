//! The crate's TLS settings ([`crate::tls`]) as tonic takes them.

use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use crate::tls::ClientTls;

pub(super) fn client(tls: &ClientTls) -> ClientTlsConfig {
    let mut config = if tls.ca_pem.is_empty() {
        ClientTlsConfig::new().with_webpki_roots()
    } else {
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&tls.ca_pem))
    };
    if let Some(domain) = &tls.domain {
        config = config.domain_name(domain.clone());
    }
    if let Some((cert, key)) = &tls.identity {
        config = config.identity(Identity::from_pem(cert, key));
    }
    config
}
