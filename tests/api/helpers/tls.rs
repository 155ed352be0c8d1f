//! Certificates for the tests of TLS, and a client that trusts them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, SanType,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

/// A CA and a server certificate it signed for localhost and 127.0.0.1, as PEM files in
/// a directory of their own, removed on drop.
pub struct Pki {
    dir: PathBuf,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA, to sign client certificates with (none for a self-signed server).
    issuer: Option<CertifiedIssuer<'static, KeyPair>>,
}

impl Pki {
    pub fn generate() -> Self {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "restock test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();

        let server_key = KeyPair::generate().unwrap();
        let mut server_params = CertificateParams::new(Self::names()).unwrap();
        server_params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let server_cert = server_params.signed_by(&server_key, &ca).unwrap();
        let mut pki = Self::written(Some(&ca.pem()), &server_cert.pem(), &server_key);
        pki.issuer = Some(ca);
        pki
    }

    /// A client certificate this CA signed, for client authentication, with `uri` as
    /// its URI SAN (if given) and `cn` as its subject CN: (certificate, key) in PEM.
    pub fn client(&self, uri: Option<&str>, cn: &str) -> (String, String) {
        let issuer = self
            .issuer
            .as_ref()
            .expect("a CA signs client certificates");
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        if let Some(uri) = uri {
            params.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// A self-signed certificate for localhost and 127.0.0.1, with no CA: `ca` is the
    /// certificate itself.
    pub fn self_signed() -> Self {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(Self::names())
            .unwrap()
            .self_signed(&key)
            .unwrap();
        Self::written(None, &cert.pem(), &key)
    }

    /// The names the server's certificate is for.
    fn names() -> Vec<String> {
        vec!["localhost".to_string(), "127.0.0.1".to_string()]
    }

    /// The PEM files in a new directory; without a CA, `ca` names the certificate.
    fn written(ca: Option<&str>, cert: &str, key: &KeyPair) -> Self {
        let dir = std::env::temp_dir().join(format!("restock-tls-{:016x}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let pki = Self {
            ca: dir.join(if ca.is_some() { "ca.pem" } else { "server.pem" }),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
            dir,
            issuer: None,
        };
        if let Some(ca) = ca {
            std::fs::write(&pki.ca, ca).unwrap();
        }
        std::fs::write(&pki.cert, cert).unwrap();
        std::fs::write(&pki.key, key.serialize_pem()).unwrap();
        pki
    }

    pub fn ca_pem(&self) -> Vec<u8> {
        std::fs::read(&self.ca).unwrap()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A channel over TLS to `addr`, trusting `ca_pem` and expecting a certificate for
/// `domain`.
pub async fn tls_channel(
    addr: SocketAddr,
    ca_pem: Vec<u8>,
    domain: &str,
) -> Result<Channel, String> {
    tls_channel_as(addr, ca_pem, domain, None).await
}

/// As [`tls_channel`], presenting `identity` (certificate and key, in PEM) if given.
pub async fn tls_channel_as(
    addr: SocketAddr,
    ca_pem: Vec<u8>,
    domain: &str,
    identity: Option<&(String, String)>,
) -> Result<Channel, String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name(domain);
    if let Some((cert, key)) = identity {
        tls = tls.identity(tonic::transport::Identity::from_pem(cert, key));
    }
    Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))
}
