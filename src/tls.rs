//! TLS for the gRPC server, from the PEM files named by RESTOCK_TLS_CERT and
//! RESTOCK_TLS_KEY. Everything is read and checked at start, so a missing file or a key
//! that does not fit stops the service before it listens, naming the setting.

use std::path::Path;

use anyhow::Context as _;
use tonic::transport::{Identity, Server, ServerTlsConfig};

/// The server builder: over TLS only when both files are given, in plaintext when
/// neither is. One without the other is a mistake, not a request for plaintext.
pub fn server(cert: Option<&Path>, key: Option<&Path>) -> anyhow::Result<Server> {
    let (cert, key) = match (cert, key) {
        (None, None) => return Ok(Server::builder()),
        (Some(cert), Some(key)) => (cert, key),
        (Some(_), None) => anyhow::bail!(
            "RESTOCK_TLS_CERT is set but RESTOCK_TLS_KEY is not: set both to serve gRPC over \
             TLS, or neither for plaintext"
        ),
        (None, Some(_)) => anyhow::bail!(
            "RESTOCK_TLS_KEY is set but RESTOCK_TLS_CERT is not: set both to serve gRPC over \
             TLS, or neither for plaintext"
        ),
    };
    let cert_pem = read_pem("RESTOCK_TLS_CERT", cert, "CERTIFICATE-----")?;
    let key_pem = read_pem("RESTOCK_TLS_KEY", key, "PRIVATE KEY-----")?;
    let tls = ServerTlsConfig::new().identity(Identity::from_pem(cert_pem, key_pem));
    // tonic parses the identity here, not when the first client connects.
    Server::builder().tls_config(tls).with_context(|| {
        format!(
            "RESTOCK_TLS_CERT {} and RESTOCK_TLS_KEY {} are not a usable certificate chain and \
             private key",
            cert.display(),
            key.display()
        )
    })
}

/// Reads a PEM file, checking it holds a block of the expected kind, so that a key given
/// as the certificate (or an empty file) is reported against the right setting.
fn read_pem(setting: &str, path: &Path, block: &str) -> anyhow::Result<Vec<u8>> {
    let pem =
        std::fs::read(path).with_context(|| format!("cannot read {setting} {}", path.display()))?;
    let text = String::from_utf8_lossy(&pem);
    let found = text
        .lines()
        .any(|line| line.starts_with("-----BEGIN ") && line.trim_end().ends_with(block));
    if !found {
        anyhow::bail!(
            "{setting} {} is not a PEM file with a {} block",
            path.display(),
            block.trim_end_matches('-')
        );
    }
    Ok(pem)
}
