//! A throwaway PKI generated in-process: a self-signed CA and a server
//! certificate for `localhost` / `127.0.0.1` signed by it.
//!
//! The daemon under test trusts the CA through `SSL_CERT_FILE=<ca.pem>`
//! (honoured by OpenSSL's default verify paths); in-process clients use
//! [`TlsCert::connector`].

use crate::TempDir;
use openssl::asn1::{Asn1Integer, Asn1Time};
use openssl::bn::BigNum;
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::x509::extension::{
    AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName,
    SubjectKeyIdentifier,
};
use openssl::x509::{X509, X509Builder, X509NameBuilder};
use std::path::{Path, PathBuf};

/// CA + server certificate. Drop removes the PEM files.
#[derive(Debug)]
pub struct TlsCert {
    /// CA certificate, PEM.
    pub ca_pem: Vec<u8>,
    /// Server certificate (leaf, then CA), PEM.
    pub cert_pem: Vec<u8>,
    /// Server private key, PKCS#8 PEM.
    pub key_pem: Vec<u8>,
    ca_file: PathBuf,
    _dir: TempDir,
}

impl TlsCert {
    /// Generates a P-256 CA and a server certificate valid for
    /// `DNS:localhost` and `IP:127.0.0.1` (one hour back, one day ahead), and
    /// writes the CA PEM to `ca_file()`.
    pub fn generate() -> TlsCert {
        Self::generate_for(&[])
    }

    /// Like [`generate`](Self::generate), with `extra_dns` names added to
    /// the server certificate (e.g. a name only a proxy can resolve).
    pub fn generate_for(extra_dns: &[&str]) -> TlsCert {
        let (ca_key, ca) = make_ca().expect("generate CA");
        let (key, cert) = make_leaf(&ca_key, &ca, extra_dns).expect("generate server certificate");
        let ca_pem = ca.to_pem().unwrap();
        let mut cert_pem = cert.to_pem().unwrap();
        cert_pem.extend_from_slice(&ca_pem);
        let key_pem = key.private_key_to_pem_pkcs8().unwrap();
        let dir = TempDir::new("tls");
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, &ca_pem).expect("write ca.pem");
        TlsCert {
            ca_pem,
            cert_pem,
            key_pem,
            ca_file,
            _dir: dir,
        }
    }

    /// Path of the CA PEM file (for `SSL_CERT_FILE`).
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    /// `("SSL_CERT_FILE", <ca.pem>)`, for `Daemon::spawn`'s extra env.
    pub fn env(&self) -> (&'static str, &str) {
        (
            "SSL_CERT_FILE",
            self.ca_file.to_str().expect("utf-8 temp path"),
        )
    }

    /// Server-side acceptor presenting the server certificate.
    pub fn acceptor(&self) -> native_tls::TlsAcceptor {
        let id = native_tls::Identity::from_pkcs8(&self.cert_pem, &self.key_pem)
            .expect("identity from PKCS#8");
        native_tls::TlsAcceptor::new(id).expect("TLS acceptor")
    }

    /// The CA as a native-tls certificate.
    pub fn ca_certificate(&self) -> native_tls::Certificate {
        native_tls::Certificate::from_pem(&self.ca_pem).expect("CA PEM")
    }

    /// Client connector that trusts the CA (in addition to the system store).
    pub fn connector(&self) -> native_tls::TlsConnector {
        native_tls::TlsConnector::builder()
            .add_root_certificate(self.ca_certificate())
            .build()
            .expect("TLS connector")
    }
}

fn new_key() -> Result<PKey<Private>, openssl::error::ErrorStack> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
    PKey::from_ec_key(EcKey::generate(&group)?)
}

fn base(subject_cn: &str, key: &PKey<Private>) -> Result<X509Builder, openssl::error::ErrorStack> {
    let mut name = X509NameBuilder::new()?;
    name.append_entry_by_text("O", "mender-connect testbed")?;
    name.append_entry_by_text("CN", subject_cn)?;
    let name = name.build();
    let mut b = X509Builder::new()?;
    b.set_version(2)?;
    let mut serial = BigNum::new()?;
    serial.rand(127, openssl::bn::MsbOption::MAYBE_ZERO, false)?;
    b.set_serial_number(Asn1Integer::from_bn(&serial)?.as_ref())?;
    b.set_subject_name(&name)?;
    b.set_pubkey(key)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    b.set_not_before(Asn1Time::from_unix(now - 3600)?.as_ref())?;
    b.set_not_after(Asn1Time::from_unix(now + 86400)?.as_ref())?;
    Ok(b)
}

fn make_ca() -> Result<(PKey<Private>, X509), openssl::error::ErrorStack> {
    let key = new_key()?;
    let mut b = base("testbed CA", &key)?;
    // Self-signed: issuer = subject.
    let subject = {
        let mut n = X509NameBuilder::new()?;
        n.append_entry_by_text("O", "mender-connect testbed")?;
        n.append_entry_by_text("CN", "testbed CA")?;
        n.build()
    };
    b.set_issuer_name(&subject)?;
    b.append_extension(BasicConstraints::new().critical().ca().build()?)?;
    b.append_extension(
        KeyUsage::new()
            .critical()
            .key_cert_sign()
            .crl_sign()
            .build()?,
    )?;
    let ski = SubjectKeyIdentifier::new().build(&b.x509v3_context(None, None))?;
    b.append_extension(ski)?;
    b.sign(&key, MessageDigest::sha256())?;
    Ok((key, b.build()))
}

fn make_leaf(
    ca_key: &PKey<Private>,
    ca: &X509,
    extra_dns: &[&str],
) -> Result<(PKey<Private>, X509), openssl::error::ErrorStack> {
    let key = new_key()?;
    let mut b = base("localhost", &key)?;
    b.set_issuer_name(ca.subject_name())?;
    b.append_extension(BasicConstraints::new().build()?)?;
    b.append_extension(
        KeyUsage::new()
            .critical()
            .digital_signature()
            .key_agreement()
            .build()?,
    )?;
    b.append_extension(ExtendedKeyUsage::new().server_auth().build()?)?;
    let mut san = SubjectAlternativeName::new();
    san.dns("localhost").ip("127.0.0.1");
    for name in extra_dns {
        san.dns(name);
    }
    let san = san.build(&b.x509v3_context(Some(ca), None))?;
    b.append_extension(san)?;
    let ski = SubjectKeyIdentifier::new().build(&b.x509v3_context(Some(ca), None))?;
    b.append_extension(ski)?;
    let aki = AuthorityKeyIdentifier::new()
        .keyid(false)
        .build(&b.x509v3_context(Some(ca), None))?;
    b.append_extension(aki)?;
    b.sign(ca_key, MessageDigest::sha256())?;
    Ok((key, b.build()))
}
