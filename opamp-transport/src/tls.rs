//! TLS settings for every listener and connector (rustls with ring), and the
//! device id a client certificate names.
//!
//! One pair of types for all transports: an operator's certificate, key and
//! client CA are the same PEM files whether devices speak gRPC or OpAMP.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use opamp_core::{DeviceId, Error, Result};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

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

    /// The rustls configuration, offering `alpn` (most preferred first).
    ///
    /// [`Error::InvalidInput`] naming what does not load.
    pub(crate) fn rustls(&self, alpn: &[&[u8]]) -> Result<rustls::ServerConfig> {
        use rustls_pki_types::pem::PemObject as _;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};

        let chain = CertificateDer::pem_slice_iter(&self.cert_chain_pem)
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|err| Error::invalid_input(format!("the TLS certificate chain: {err}")))?;
        if chain.is_empty() {
            return Err(Error::invalid_input("the TLS certificate chain has no certificate"));
        }
        let key = PrivateKeyDer::from_pem_slice(&self.key_pem)
            .map_err(|err| Error::invalid_input(format!("the TLS private key: {err}")))?;
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|err| Error::invalid_input(format!("TLS protocol versions: {err}")))?;
        let builder = match &self.client_ca_pem {
            Some(ca) => {
                let roots = roots(ca, "the client CA")?;
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider())
                    .build()
                    .map_err(|err| Error::invalid_input(format!("the client CA: {err}")))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(chain, key)
            .map_err(|err| Error::invalid_input(format!("the TLS certificate and key: {err}")))?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(config)
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
#[derive(Clone, Default)]
#[non_exhaustive]
pub struct ClientTls {
    /// The CA the server's certificate must chain to; the Mozilla roots
    /// (webpki-roots) when empty.
    pub ca_pem: Vec<u8>,
    /// The name to check the server certificate against, when it is not the URL's host.
    pub domain: Option<String>,
    /// The device's certificate chain and key, for client-certificate authentication.
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

    /// Trusting the public web's CAs (the Mozilla roots).
    pub fn public_roots() -> Self {
        ClientTls::default()
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

    /// The rustls configuration, offering `alpn`.
    ///
    /// [`Error::InvalidInput`] naming what does not load.
    // Only OpAMP's connector builds its own; tonic builds gRPC's.
    #[cfg_attr(not(feature = "websocket"), allow(dead_code))]
    pub(crate) fn rustls(&self, alpn: &[&[u8]]) -> Result<rustls::ClientConfig> {
        use rustls_pki_types::pem::PemObject as _;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};

        let roots = if self.ca_pem.is_empty() {
            rustls::RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            }
        } else {
            roots(&self.ca_pem, "the TLS CA")?
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|err| Error::invalid_input(format!("TLS protocol versions: {err}")))?
            .with_root_certificates(roots);
        let mut config = match &self.identity {
            Some((chain, key)) => {
                let chain = CertificateDer::pem_slice_iter(chain)
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .map_err(|err| Error::invalid_input(format!("the client certificate: {err}")))?;
                let key = PrivateKeyDer::from_pem_slice(key)
                    .map_err(|err| Error::invalid_input(format!("the client key: {err}")))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|err| Error::invalid_input(format!("the client certificate and key: {err}")))?
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(config)
    }
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("domain", &self.domain)
            .field("public_roots", &self.ca_pem.is_empty())
            .field("client_certificate", &self.identity.is_some())
            .finish_non_exhaustive()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(pem: &[u8], what: &str) -> Result<rustls::RootCertStore> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject as _;

    let mut roots = rustls::RootCertStore::empty();
    for certificate in CertificateDer::pem_slice_iter(pem) {
        let certificate = certificate.map_err(|err| Error::invalid_input(format!("{what}: {err}")))?;
        roots
            .add(certificate)
            .map_err(|err| Error::invalid_input(format!("{what}: {err}")))?;
    }
    if roots.is_empty() {
        return Err(Error::invalid_input(format!("{what} has no certificate")));
    }
    Ok(roots)
}

/// A listener's TLS configuration, which an operator may replace while it
/// serves (a renewed certificate): connections from then on use the new one,
/// open ones keep theirs. The transports hold one each (their `reload_tls`);
/// [`ServeConfig::tls`](crate::http_api::ServeConfig) hands the REST
/// listener's out.
#[derive(Debug)]
pub struct Reloadable {
    alpn: Vec<&'static [u8]>,
    config: RwLock<Arc<rustls::ServerConfig>>,
}

impl Reloadable {
    pub(crate) fn new(tls: &ServerTls, alpn: &[&'static [u8]]) -> Result<Self> {
        Ok(Reloadable {
            alpn: alpn.to_vec(),
            config: RwLock::new(Arc::new(tls.rustls(alpn)?)),
        })
    }

    /// Serves `tls` to connections from now on; the old settings stay if it
    /// does not load ([`Error::InvalidInput`] naming what does not).
    pub fn reload(&self, tls: &ServerTls) -> Result<()> {
        let config = Arc::new(tls.rustls(&self.alpn)?);
        *self.config.write().unwrap_or_else(|p| p.into_inner()) = config;
        Ok(())
    }

    /// TLS over `tcp`, with the settings of now, and the device its client
    /// certificate names; the handshake must be done `within`.
    pub(crate) async fn handshake(&self, tcp: TcpStream, within: Duration) -> io::Result<(ServerStream, Certified)> {
        let config = Arc::clone(&self.config.read().unwrap_or_else(|p| p.into_inner()));
        let accept = tokio_rustls::TlsAcceptor::from(config).accept(tcp);
        let stream = tokio::time::timeout(within, accept)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no TLS handshake within the deadline"))??;
        let certified = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .map(|leaf| device_of_certificate(leaf));
        Ok((MaybeTls::Tls(Box::new(stream)), certified))
    }
}

/// The device a connection's client certificate names, or why it names
/// none; `None` without a client certificate.
pub(crate) type Certified = Option<std::result::Result<DeviceId, String>>;

/// A connection as a tokio stream, plain or TLS (`T`, each side's TLS stream).
pub(crate) enum MaybeTls<T> {
    Plain(TcpStream),
    Tls(Box<T>),
}

/// A server's connection.
pub(crate) type ServerStream = MaybeTls<tokio_rustls::server::TlsStream<TcpStream>>;
/// A client's connection.
pub(crate) type ClientStream = MaybeTls<tokio_rustls::client::TlsStream<TcpStream>>;

impl<T: AsyncRead + Unpin> AsyncRead for MaybeTls<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            MaybeTls::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for MaybeTls<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            MaybeTls::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(tcp) => Pin::new(tcp).poll_write_vectored(cx, bufs),
            MaybeTls::Tls(tls) => Pin::new(tls.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            MaybeTls::Plain(tcp) => tcp.is_write_vectored(),
            MaybeTls::Tls(tls) => tls.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            MaybeTls::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            MaybeTls::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The device id a client certificate (DER) names: its subject's Common Name.
pub(crate) fn device_of_certificate(der: &[u8]) -> std::result::Result<DeviceId, String> {
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
