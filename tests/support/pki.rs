//! Throwaway PKI for one test control plane: a CA, the API server's serving certificate, an admin
//! client certificate and the service-account signing key pair, all written as PEM files.
//!
//! Every key is ECDSA P-256: rcgen can only generate RSA keys with aws-lc-rs, and the API server
//! accepts ES256 for service-account tokens just as well.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// The generated material: file paths for the components, PEM/DER in memory for the clients.
pub struct Pki {
    pub ca_cert_file: PathBuf,
    pub serving_cert_file: PathBuf,
    pub serving_key_file: PathBuf,
    pub sa_public_key_file: PathBuf,
    pub sa_private_key_file: PathBuf,
    pub ca_pem: String,
    pub admin_cert_pem: String,
    pub admin_key_pem: String,
    pub ca_der: CertificateDer<'static>,
    pub admin_cert_der: CertificateDer<'static>,
    admin_key_der: Vec<u8>,
}

impl Pki {
    /// Generates everything and writes the files the components read into `dir`.
    pub fn generate(dir: &Path) -> Result<Pki> {
        let (ca_params, ca_key) = ca_params()?;
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let ca = Issuer::new(ca_params, ca_key);

        // rustls refuses a self-signed leaf, so the server gets a proper leaf issued by the CA.
        let serving_key = KeyPair::generate()?;
        let serving_cert = leaf(
            vec!["127.0.0.1".into(), "localhost".into()],
            "kube-apiserver",
            None,
            ExtendedKeyUsagePurpose::ServerAuth,
        )?
        .signed_by(&serving_key, &ca)?;

        // O=system:masters is what makes the API server treat this client as cluster admin.
        let admin_key = KeyPair::generate()?;
        let admin_cert = leaf(
            Vec::new(),
            "admin",
            Some("system:masters"),
            ExtendedKeyUsagePurpose::ClientAuth,
        )?
        .signed_by(&admin_key, &ca)?;

        let sa_key = KeyPair::generate()?;

        let pki = Pki {
            ca_cert_file: dir.join("ca.crt"),
            serving_cert_file: dir.join("apiserver.crt"),
            serving_key_file: dir.join("apiserver.key"),
            sa_public_key_file: dir.join("sa.pub"),
            sa_private_key_file: dir.join("sa.key"),
            ca_pem: ca_cert.pem(),
            admin_cert_pem: admin_cert.pem(),
            admin_key_pem: admin_key.serialize_pem(),
            ca_der: ca_cert.der().clone(),
            admin_cert_der: admin_cert.der().clone(),
            admin_key_der: admin_key.serialize_der(),
        };
        write(&pki.ca_cert_file, &pki.ca_pem)?;
        write(&pki.serving_cert_file, &serving_cert.pem())?;
        write(&pki.serving_key_file, &serving_key.serialize_pem())?;
        write(&pki.sa_public_key_file, &sa_key.public_key_pem())?;
        write(&pki.sa_private_key_file, &sa_key.serialize_pem())?;
        Ok(pki)
    }

    /// The admin client key in the form rustls wants it.
    pub fn admin_key_der(&self) -> PrivateKeyDer<'static> {
        PrivatePkcs8KeyDer::from(self.admin_key_der.clone()).into()
    }
}

fn ca_params() -> Result<(CertificateParams, KeyPair)> {
    let mut params = CertificateParams::new(Vec::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, "endpoints-operator test CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok((params, KeyPair::generate()?))
}

/// Parameters of an end-entity certificate; rcgen's default validity (1975–4096) is fine here.
fn leaf(
    sans: Vec<String>,
    common_name: &str,
    organization: Option<&str>,
    usage: ExtendedKeyUsagePurpose,
) -> Result<CertificateParams> {
    let mut params = CertificateParams::new(sans)?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    if let Some(org) = organization {
        params
            .distinguished_name
            .push(DnType::OrganizationName, org);
    }
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

fn write(path: &Path, pem: &str) -> Result<()> {
    fs::write(path, pem).with_context(|| format!("writing {}", path.display()))
}
