//! rustls client configuration for each `sslmode`, the way libpq reads them:
//! `require` encrypts without checking the certificate (unless a root certificate is
//! given, then it behaves as `verify-ca`); `verify-ca` checks the chain; `verify-full`
//! also checks the host name.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::conninfo::{ConnConfig, SslMode};
use crate::error::{Error, Result};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn roots(cfg: &ConnConfig) -> Result<Option<RootCertStore>> {
    let tls_err = |reason: String| Error::Tls { target: cfg.target(), reason };
    let path = match &cfg.sslrootcert {
        Some(p) => Some(p.clone()),
        None => std::env::var_os("HOME").map(|h| Path::new(&h).join(".postgresql/root.crt")).filter(|p| p.exists()),
    };
    let mut store = RootCertStore::empty();
    match path {
        Some(p) if p.as_os_str() == "system" => {
            for c in rustls_native_certs::load_native_certs().certs {
                let _ = store.add(c);
            }
        }
        Some(p) => {
            let pem =
                std::fs::read(&p).map_err(|e| tls_err(format!("cannot read sslrootcert {}: {e}", p.display())))?;
            let mut n = 0;
            for c in rustls_pemfile::certs(&mut &pem[..]) {
                let c = c.map_err(|e| tls_err(format!("sslrootcert {}: {e}", p.display())))?;
                store.add(c).map_err(|e| tls_err(format!("sslrootcert {}: {e}", p.display())))?;
                n += 1;
            }
            if n == 0 {
                return Err(tls_err(format!("sslrootcert {} holds no PEM certificate", p.display())));
            }
        }
        None => return Ok(None),
    }
    Ok(Some(store))
}

/// The rustls configuration for `cfg.sslmode`, or `None` for `disable`.
pub fn client_config(cfg: &ConnConfig) -> Result<Option<Arc<ClientConfig>>> {
    let tls_err = |reason: String| Error::Tls { target: cfg.target(), reason };
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err(e.to_string()))?;
    let roots = match cfg.sslmode {
        SslMode::Disable => return Ok(None),
        _ => roots(cfg)?,
    };
    let verifier: Arc<dyn ServerCertVerifier> = match (cfg.sslmode, roots) {
        (SslMode::VerifyCa | SslMode::VerifyFull, None) => {
            return Err(tls_err(format!(
                "sslmode={} needs a root certificate: set sslrootcert=/path/to/root.crt (or sslrootcert=system)",
                if cfg.sslmode == SslMode::VerifyCa { "verify-ca" } else { "verify-full" }
            )))
        }
        (SslMode::VerifyFull, Some(r)) => WebPkiServerVerifier::builder_with_provider(Arc::new(r), provider())
            .build()
            .map_err(|e| tls_err(e.to_string()))?,
        (SslMode::VerifyCa | SslMode::Require, Some(r)) => Arc::new(Lenient {
            chain: Some(
                WebPkiServerVerifier::builder_with_provider(Arc::new(r), provider())
                    .build()
                    .map_err(|e| tls_err(e.to_string()))?,
            ),
            provider: provider(),
        }),
        (_, _) => Arc::new(Lenient { chain: None, provider: provider() }),
    };
    Ok(Some(Arc::new(builder.dangerous().with_custom_certificate_verifier(verifier).with_no_client_auth())))
}

/// What libpq checks below verify-full: with `chain`, the certificate must lead to a trusted
/// root but its name is not checked (verify-ca, or require with a root certificate);
/// without, any certificate is accepted (require/prefer: encrypted, not authenticated).
/// Handshake signatures are always verified.
#[derive(Debug)]
struct Lenient {
    chain: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else { return Ok(ServerCertVerified::assertion()) };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.provider.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.provider.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// RFC 5929 `tls-server-end-point`: the hash of the server certificate with the hash of its
/// signature algorithm (SHA-256 for MD5 and SHA-1), as PostgreSQL computes it. `None` for
/// algorithms without one (Ed25519, RSA-PSS): no channel binding then.
pub fn server_end_point(cert_der: &[u8]) -> Option<Vec<u8>> {
    use sha2::Digest;
    let oid = signature_algorithm_oid(cert_der)?;
    // 1.2.840.113549.1.1.{4 md5,5 sha1,11 sha256,12 sha384,13 sha512}; 1.2.840.10045.4.{1 sha1,3.2,3.3,3.4}
    const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
    const ECDSA: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04];
    let bits = match oid {
        [p @ .., n] if p == RSA => match n {
            4 | 5 | 11 => 256,
            12 => 384,
            13 => 512,
            _ => return None,
        },
        [p @ .., 1] if p == ECDSA => 256,
        [p @ .., 3, n] if p == ECDSA => match n {
            2 => 256,
            3 => 384,
            4 => 512,
            _ => return None,
        },
        _ => return None,
    };
    Some(match bits {
        256 => sha2::Sha256::digest(cert_der).to_vec(),
        384 => sha2::Sha384::digest(cert_der).to_vec(),
        _ => sha2::Sha512::digest(cert_der).to_vec(),
    })
}

/// One DER element at the start of `b`: (tag, content, rest).
fn der(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *b.first()?;
    let first = *b.get(1)? as usize;
    let (len, head) = if first < 0x80 {
        (first, 2)
    } else {
        let n = first & 0x7f;
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | *b.get(2 + i)? as usize;
        }
        (len, 2 + n)
    };
    let end = head.checked_add(len)?;
    Some((tag, b.get(head..end)?, b.get(end..)?))
}

/// The OID bytes of a certificate's outer `signatureAlgorithm`.
fn signature_algorithm_oid(cert: &[u8]) -> Option<&[u8]> {
    let (0x30, body, _) = der(cert)? else { return None };
    let (0x30, _tbs, rest) = der(body)? else { return None };
    let (0x30, alg, _) = der(rest)? else { return None };
    let (0x06, oid, _) = der(alg)? else { return None };
    Some(oid)
}
