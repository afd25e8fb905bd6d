//! TLS settings for both sides (rustls), and the device id in a client certificate.

use std::fmt;

use opamp_core::DeviceId;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// The server's certificate and key, and optionally the CA that client certificates must chain to.
///
/// All PEM. Its `Debug` leaves out the private key.
#[derive(Clone)]
#[non_exhaustive]
pub struct ServerTls {
    /// The server's certificate chain, leaf first.
    pub cert_chain_pem: Vec<u8>,
    /// The server's private key.
    pub key_pem: Vec<u8>,
    /// When set, every client must present a certificate signed by this CA (mTLS).
    pub client_ca_pem: Option<Vec<u8>>,
}

impl ServerTls {
    /// Serving with this certificate chain and key; clients are not asked for certificates.
    pub fn new(cert_chain_pem: impl Into<Vec<u8>>, key_pem: impl Into<Vec<u8>>) -> Self {
        ServerTls {
            cert_chain_pem: cert_chain_pem.into(),
            key_pem: key_pem.into(),
            client_ca_pem: None,
        }
    }

    /// Requiring client certificates signed by `ca_pem`.
    pub fn client_ca(mut self, ca_pem: impl Into<Vec<u8>>) -> Self {
        self.client_ca_pem = Some(ca_pem.into());
        self
    }

    pub(super) fn to_tonic(&self) -> ServerTlsConfig {
        let identity = Identity::from_pem(&self.cert_chain_pem, &self.key_pem);
        let config = ServerTlsConfig::new().identity(identity);
        match &self.client_ca_pem {
            Some(ca) => config.client_ca_root(Certificate::from_pem(ca)),
            None => config,
        }
    }
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("cert_chain_pem", &format_args!("{} bytes", self.cert_chain_pem.len()))
            .field("mtls", &self.client_ca_pem.is_some())
            .finish_non_exhaustive()
    }
}

/// What a device trusts, and optionally the certificate it presents (mTLS).
///
/// All PEM. Its `Debug` leaves out the private key.
#[derive(Clone)]
#[non_exhaustive]
pub struct ClientTls {
    /// The CA the supervisor's certificate must chain to.
    pub ca_pem: Vec<u8>,
    /// The name to check the server certificate against, when it is not the URL's host.
    pub domain: Option<String>,
    /// The device's certificate chain and key, for [`DeviceAuth::ClientCertificate`](super::DeviceAuth::ClientCertificate).
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl ClientTls {
    /// Trusting servers whose certificates chain to `ca_pem`.
    pub fn new(ca_pem: impl Into<Vec<u8>>) -> Self {
        ClientTls {
            ca_pem: ca_pem.into(),
            domain: None,
            identity: None,
        }
    }

    /// Checking the server certificate against `domain`.
    pub fn domain(mut self, domain: impl Into<String>) -> Self {
        self.domain = Some(domain.into());
        self
    }

    /// Presenting this certificate chain, proven by `key_pem`.
    pub fn identity(mut self, cert_chain_pem: impl Into<Vec<u8>>, key_pem: impl Into<Vec<u8>>) -> Self {
        self.identity = Some((cert_chain_pem.into(), key_pem.into()));
        self
    }

    pub(super) fn to_tonic(&self) -> ClientTlsConfig {
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.ca_pem));
        if let Some(domain) = &self.domain {
            config = config.domain_name(domain.clone());
        }
        if let Some((cert, key)) = &self.identity {
            config = config.identity(Identity::from_pem(cert, key));
        }
        config
    }
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("domain", &self.domain)
            .field("client_certificate", &self.identity.is_some())
            .finish_non_exhaustive()
    }
}

/// The device id a client certificate (DER) names: its subject's Common Name.
pub(super) fn device_of_certificate(der: &[u8]) -> Result<DeviceId, String> {
    let (_, certificate) = x509_parser::parse_x509_certificate(der)
        .map_err(|err| format!("the client certificate cannot be parsed: {err}"))?;
    let common_name = certificate
        .subject()
        .iter_common_name()
        .next()
        .ok_or("the client certificate's subject has no Common Name")?;
    let text = common_name
        .as_str()
        .map_err(|err| format!("the client certificate's Common Name is not text: {err}"))?;
    DeviceId::new(text).map_err(|err| format!("the client certificate's Common Name is not a device id: {err}"))
}
