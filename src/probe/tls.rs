//! TLS client settings shared by the HTTPS and gRPC probers. Without verification settings the
//! handshake still checks signatures but accepts any certificate (the kubelet's behaviour); with
//! them the chain must lead to the given CA and carry the given name (default: the host's IP).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, OnceLock};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::Failure;
use crate::model::TlsVerify;

fn provider() -> Arc<CryptoProvider> {
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
}

/// A client config for `verify` (cached: many targets share few settings).
pub fn client_config(
    verify: Option<&TlsVerify>,
    host: IpAddr,
    alpn: &[&[u8]],
) -> Result<Arc<ClientConfig>, Failure> {
    type Key = (Option<TlsVerify>, Option<IpAddr>, Vec<Vec<u8>>);
    static CACHE: OnceLock<Mutex<HashMap<Key, Arc<ClientConfig>>>> = OnceLock::new();
    // Verification against the IP depends on the host; otherwise one config serves all hosts.
    let host_part = verify.filter(|v| v.server_name.is_none()).map(|_| host);
    let key = (
        verify.cloned(),
        host_part,
        alpn.iter().map(|a| a.to_vec()).collect(),
    );
    let cache = CACHE.get_or_init(Default::default);
    if let Some(config) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Ok(config.clone());
    }
    let verifier: Arc<dyn ServerCertVerifier> = match verify {
        None => Arc::new(AcceptAny(provider().signature_verification_algorithms)),
        Some(v) => Arc::new(Named::new(v, host)?),
    };
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Failure::Error(format!("TLS setup: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = key.2.clone();
    let config = Arc::new(config);
    cache
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, config.clone());
    Ok(config)
}

/// The name the certificate must carry, for SNI and verification.
pub fn server_name(verify: Option<&TlsVerify>, host: IpAddr) -> ServerName<'static> {
    verify
        .and_then(|v| v.server_name.as_deref())
        .and_then(|n| ServerName::try_from(n.to_string()).ok())
        .unwrap_or(ServerName::IpAddress(host.into()))
}

#[derive(Debug)]
struct AcceptAny(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// WebPKI verification against a fixed name, whatever address the connection went to.
#[derive(Debug)]
struct Named {
    inner: Arc<WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl Named {
    fn new(verify: &TlsVerify, host: IpAddr) -> Result<Named, Failure> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(verify.ca_pem.as_bytes()) {
            let cert = cert.map_err(|e| Failure::Error(format!("caBundle: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| Failure::Error(format!("caBundle: {e}")))?;
        }
        let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| Failure::Error(format!("caBundle: {e}")))?;
        Ok(Named {
            inner,
            name: server_name(Some(verify), host),
        })
    }
}

impl ServerCertVerifier for Named {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp, now)
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(m, c, d)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
