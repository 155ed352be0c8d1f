//! TLS for the gRPC server, from the PEM files named by RESTOCK_TLS_CERT and
//! RESTOCK_TLS_KEY. Everything is read and checked at start, so a missing file or a key
//! that does not fit stops the service before it listens, naming the setting.
//!
//! The service does the handshakes itself rather than through tonic's TLS, which offers
//! HTTP/2 alone by ALPN: a gRPC-web client or a proxy that offers only HTTP/1.1 would be
//! refused at the handshake, though the server speaks HTTP/1.1 (the console's page and
//! gRPC-web). Here ALPN offers both, HTTP/2 first.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures::{Stream, StreamExt as _};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// How long a client has to complete its handshake. One that opens a connection and
/// says nothing holds a socket and a task until then, not for ever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes finished but not yet taken by the server: it takes them as fast as they
/// come, so this only smooths a burst of new connections.
const READY_BACKLOG: usize = 64;

/// Handshakes under way at once. Past it, connections wait in the listen backlog: a
/// flood of clients that never finish costs a bounded number of sockets and tasks.
const MAX_HANDSHAKES: usize = 1024;

/// After a failed accept (out of file descriptors, say), a pause before the next: the
/// failure would otherwise repeat at once, at full speed, until something is freed.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// TLS when both files are given, plaintext (`None`) when neither is. One without the
/// other is a mistake, not a request for plaintext.
pub fn acceptor(
    cert: Option<&Path>,
    key: Option<&Path>,
    client_ca: Option<&Path>,
) -> anyhow::Result<Option<TlsAcceptor>> {
    let (cert, key) = match (cert, key) {
        (None, None) if client_ca.is_some() => anyhow::bail!(
            "RESTOCK_TLS_CLIENT_CA is set without RESTOCK_TLS_CERT and RESTOCK_TLS_KEY: \
             client certificates are asked for over TLS only"
        ),
        (None, None) => return Ok(None),
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
    let unusable = || {
        format!(
            "RESTOCK_TLS_CERT {} and RESTOCK_TLS_KEY {} are not a usable certificate chain and \
             private key",
            cert.display(),
            key.display()
        )
    };
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .with_context(unusable)?;
    let private_key = PrivateKeyDer::from_pem_slice(&key_pem).with_context(unusable)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => builder.with_client_cert_verifier(client_verifier(ca, provider)?),
    };
    let mut config = builder
        // Checks that the key is the certificate's.
        .with_single_cert(chain, private_key)
        .with_context(unusable)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Some(TlsAcceptor::from(Arc::new(config))))
}

/// Mutual TLS: every client must present a certificate that chains to one of the CA
/// certificates of `ca`; which caller it is is decided per call, by its identity.
fn client_verifier(
    ca: &Path,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> anyhow::Result<Arc<dyn rustls::server::danger::ClientCertVerifier>> {
    let pem = read_pem("RESTOCK_TLS_CLIENT_CA", ca, "CERTIFICATE-----")?;
    let unusable = || {
        format!(
            "RESTOCK_TLS_CLIENT_CA {} holds no usable CA certificate",
            ca.display()
        )
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        roots
            .add(cert.with_context(unusable)?)
            .with_context(unusable)?;
    }
    rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .with_context(unusable)
}

/// The connections of `tcp`, each once its TLS handshake is done. Handshakes run side
/// by side, so a client that stalls its own holds up no other; one that fails or runs
/// out of time is dropped. Ends when the server stops taking connections.
pub fn incoming<S>(
    tcp: S,
    acceptor: TlsAcceptor,
) -> impl Stream<Item = std::io::Result<TlsStream<TcpStream>>> + Send + 'static
where
    S: Stream<Item = std::io::Result<TcpStream>> + Send + 'static,
{
    incoming_within(tcp, acceptor, HANDSHAKE_TIMEOUT)
}

/// [`incoming`], with handshakes given `timeout`.
fn incoming_within<S>(
    tcp: S,
    acceptor: TlsAcceptor,
    timeout: Duration,
) -> impl Stream<Item = std::io::Result<TlsStream<TcpStream>>> + Send + 'static
where
    S: Stream<Item = std::io::Result<TcpStream>> + Send + 'static,
{
    let (ready, taken) = tokio::sync::mpsc::channel(READY_BACKLOG);
    tokio::spawn(async move {
        let mut tcp = std::pin::pin!(tcp);
        let mut handshakes = JoinSet::new();
        loop {
            tokio::select! {
                accepted = tcp.next(), if handshakes.len() < MAX_HANDSHAKES => match accepted {
                    Some(Ok(stream)) => {
                        let acceptor = acceptor.clone();
                        handshakes.spawn(tokio::time::timeout(
                            timeout,
                            async move { acceptor.accept(stream).await },
                        ));
                    }
                    // The server decides about failed accepts, as without TLS.
                    Some(Err(err)) => {
                        if ready.send(Err(err)).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    }
                    None => return,
                },
                Some(done) = handshakes.join_next() => match done {
                    Ok(Ok(Ok(stream))) => {
                        if ready.send(Ok(stream)).await.is_err() {
                            return;
                        }
                    }
                    Ok(Ok(Err(err))) => tracing::debug!(error = %err, "TLS handshake failed"),
                    Ok(Err(_)) => tracing::debug!("TLS handshake timed out"),
                    Err(err) => tracing::debug!(error = %err, "TLS handshake task failed"),
                },
                // The server stopped taking connections: stop listening.
                () = ready.closed() => return,
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(taken)
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

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt as _;

    use super::*;

    /// An acceptor with a fresh self-signed certificate for localhost.
    fn acceptor_for_tests() -> TlsAcceptor {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let dir =
            std::env::temp_dir().join(format!("restock-tls-unit-{:016x}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        let acceptor = acceptor(Some(&cert_path), Some(&key_path), None)
            .unwrap()
            .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        acceptor
    }

    /// A client that connects and never starts its handshake is dropped once its time
    /// is up: its connection is closed under it.
    #[tokio::test]
    async fn a_client_that_never_starts_its_handshake_is_dropped_when_its_time_is_up() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tcp = tonic::transport::server::TcpIncoming::from(listener);
        let served = incoming_within(tcp, acceptor_for_tests(), Duration::from_millis(200));
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut byte))
            .await
            .expect("the connection is closed, not left open");
        assert!(
            matches!(read, Ok(0) | Err(_)),
            "the server sent something: {read:?}"
        );
        drop(served);
    }
}
