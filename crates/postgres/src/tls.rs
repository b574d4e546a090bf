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
