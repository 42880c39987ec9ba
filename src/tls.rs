//! TLS for the four connections (README, "TLS and credentials").
//!
//! This file owns what the TLS variables mean: the per-service settings
//! read by `config` (an extra CA bundle, a client certificate and key, the
//! switch that skips verification), the rustls client configuration built
//! from them, and the words an operator reads when a handshake fails.
//! Each client library is handed the same trust: Mozilla's public roots,
//! which the binary carries (a `FROM scratch` image has no CA store), plus
//! the service's bundle when one is set. One crypto provider (ring) serves
//! all four.
//!
//! Without the `tls` cargo feature only the settings exist; `config`
//! refuses any TLS variable or URL with the reason.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

/// One of the four services, for the variable prefix and the messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Service {
    /// RabbitMQ (`RABBITMQ_`).
    Rabbitmq,
    /// MySQL (`DATABASE_`).
    Mysql,
    /// Redis (`REDIS_`).
    Redis,
    /// Elasticsearch or OpenSearch (`ELASTICSEARCH_`).
    Elasticsearch,
}

impl Service {
    /// Every service, in the order of the variable table.
    pub const ALL: [Service; 4] = [
        Service::Rabbitmq,
        Service::Mysql,
        Service::Redis,
        Service::Elasticsearch,
    ];

    /// The prefix of its variables: `RABBITMQ`, `DATABASE`, `REDIS`,
    /// `ELASTICSEARCH`.
    pub fn prefix(self) -> &'static str {
        match self {
            Service::Rabbitmq => "RABBITMQ",
            Service::Mysql => "DATABASE",
            Service::Redis => "REDIS",
            Service::Elasticsearch => "ELASTICSEARCH",
        }
    }

    /// The name used in logs and `/readyz`: `rabbitmq`, `mysql`, `redis`,
    /// `elasticsearch`.
    pub fn name(self) -> &'static str {
        match self {
            Service::Rabbitmq => "rabbitmq",
            Service::Mysql => "mysql",
            Service::Redis => "redis",
            Service::Elasticsearch => "elasticsearch",
        }
    }
}

/// A PEM file read at start: where it came from and its bytes.
#[derive(Clone)]
pub struct PemFile {
    /// The file's path, as the variable gave it.
    pub path: PathBuf,
    /// The whole file.
    pub pem: Arc<[u8]>,
}

impl fmt::Debug for PemFile {
    // Never the bytes: a key file is a secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PemFile({})", self.path.display())
    }
}

/// The TLS settings of one service: `<S>_TLS_CA_FILE`,
/// `<S>_TLS_CERT_FILE` with `<S>_TLS_KEY_FILE`, `<S>_TLS_INSECURE`.
/// Whether TLS is used at all is the URL's scheme (or DATABASE_SSL_MODE).
#[derive(Clone, Debug, Default)]
pub struct Settings {
    /// Extra trusted CAs, added to the public roots.
    pub ca: Option<PemFile>,
    /// Client certificate chain and private key (mutual TLS).
    pub identity: Option<(PemFile, PemFile)>,
    /// Skip verification of the server's certificate (test rigs only).
    pub insecure: bool,
}

/// MySQL's `--ssl-mode` values, as DATABASE_SSL_MODE takes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    /// Plain connections only.
    Disabled,
    /// TLS when the server offers it, plain otherwise; the certificate is
    /// not verified (MySQL's client default).
    Preferred,
    /// TLS or no connection; the certificate is not verified.
    Required,
    /// TLS with the certificate verified against the trusted CAs; the host
    /// name is not checked.
    VerifyCa,
    /// TLS with the certificate and the host name verified.
    VerifyIdentity,
}

impl SslMode {
    /// Parses `disabled`, `preferred`, `required`, `verify_ca`,
    /// `verify_identity` (ASCII case ignored, `-` accepted for `_`).
    pub fn parse(raw: &str) -> Option<SslMode> {
        match raw.trim().to_ascii_lowercase().replace('-', "_").as_str() {
            "disabled" => Some(SslMode::Disabled),
            "preferred" => Some(SslMode::Preferred),
            "required" => Some(SslMode::Required),
            "verify_ca" => Some(SslMode::VerifyCa),
            "verify_identity" => Some(SslMode::VerifyIdentity),
            _ => None,
        }
    }
}

/// What a failed TLS handshake or an authentication refusal means, in the
/// words of the operator's checklist, read from the error's text (each
/// client library wraps rustls's error its own way, but keeps its text).
/// `None` when `text` is not a TLS or authentication failure.
pub fn refusal(text: &str) -> Option<&'static str> {
    let t = text;
    if t.contains("UnknownIssuer") || t.contains("unknown issuer") {
        Some("unknown issuer: the server's certificate is not signed by a trusted CA")
    } else if t.contains("not valid for any names") {
        Some("name mismatch: the server's certificate names no host in a subjectAltName (a CN alone is not checked)")
    } else if t.contains("not valid for name") || t.contains("NotValidForName") {
        Some("name mismatch: the server's certificate is not valid for this host name")
    } else if t.contains("certificate expired") || t.contains("Expired") {
        Some("expired: the server's certificate is out of its validity period")
    } else if t.contains("received fatal alert") || t.contains("AlertReceived") {
        Some("handshake refused by the server (a client certificate it does not accept, or no common protocol)")
    } else if t.contains("invalid peer certificate") {
        Some("invalid certificate")
    } else if t.contains("corrupt message") || t.contains("InvalidContentType") {
        Some("handshake failed: the server does not speak TLS on this port")
    } else if t.contains("ACCESS_REFUSED")
        || t.contains("Access denied")
        || t.contains("WRONGPASS")
        || t.contains("NOAUTH")
        || t.contains("AuthenticationFailed")
        || t.contains("invalid username-password")
    {
        Some("authentication refused")
    } else {
        None
    }
}

/// One line for the log and `/readyz`: `"<what> (<error>)"` when `error`
/// is a refusal, else `error` as it is.
pub fn explain(error: &str) -> String {
    match refusal(error) {
        Some(what) if !error.starts_with(what) => format!("{what} ({error})"),
        _ => error.to_string(),
    }
}

#[cfg(feature = "tls")]
pub use with_tls::*;

#[cfg(feature = "tls")]
mod with_tls {
    use super::{PemFile, Settings};
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::crypto::CryptoProvider;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
    use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
    use std::sync::Arc;

    /// The crypto provider every TLS connection of the writer uses.
    pub fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// Makes ring the process's rustls provider, for the client libraries
    /// that build their own configuration (`ClientConfig::builder()`).
    /// Call once at start; later calls do nothing.
    pub fn install_provider() {
        let _ = rustls::crypto::ring::default_provider().install_default();
    }

    /// The certificates of a PEM bundle. Errors: no `CERTIFICATE` block,
    /// or one that does not decode, in words.
    pub fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
        let certs = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("not a PEM certificate bundle: {e}"))?;
        if certs.is_empty() {
            return Err("no PEM CERTIFICATE block in it".into());
        }
        Ok(certs)
    }

    /// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1). Errors: none
    /// found, in words.
    pub fn private_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, String> {
        PrivateKeyDer::from_pem_slice(pem)
            .map_err(|e| format!("no PEM private key in it (PKCS#8, RSA or EC): {e}"))
    }

    /// The public roots plus the certificates of `ca`.
    fn root_store(ca: Option<&PemFile>) -> Result<RootCertStore, String> {
        let mut roots = RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        if let Some(ca) = ca {
            for cert in certificates(&ca.pem)? {
                roots
                    .add(cert)
                    .map_err(|e| format!("a certificate that is not a usable CA: {e}"))?;
            }
        }
        Ok(roots)
    }

    /// The rustls client configuration for `s` (the AMQP connection builds
    /// its TLS stream with it; `config` builds it once at start to check
    /// the files). Errors: a file that does not parse, or a key that does
    /// not match its certificate, in words (the caller names the variable).
    pub fn client_config(s: &Settings) -> Result<Arc<ClientConfig>, String> {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let builder = if s.insecure {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerification(provider())))
        } else {
            builder.with_root_certificates(root_store(s.ca.as_ref())?)
        };
        let config = match &s.identity {
            Some((cert, key)) => builder
                .with_client_auth_cert(certificates(&cert.pem)?, private_key(&key.pem)?)
                .map_err(|e| format!("client certificate and key do not go together: {e}"))?,
            None => builder.with_no_client_auth(),
        };
        Ok(Arc::new(config))
    }

    /// The public roots as whole certificates (DER), as the binary carries
    /// them: borrowing them copies nothing.
    pub fn public_root_certificates() -> &'static [CertificateDer<'static>] {
        webpki_root_certs::TLS_SERVER_ROOT_CERTS
    }

    /// The public roots as whole certificates plus those of `ca`, for a
    /// library that takes a list of certificates instead of adding to its
    /// roots (ureq). The public ones are borrowed.
    pub fn root_certificates(ca: &PemFile) -> Result<Vec<CertificateDer<'static>>, String> {
        let mut all = public_root_certificates().to_vec();
        all.extend(certificates(&ca.pem)?);
        Ok(all)
    }

    /// The `<S>_TLS_INSECURE=true` verifier: any certificate, any name;
    /// signatures are still checked, so the handshake itself is sound.
    #[derive(Debug)]
    struct NoVerification(Arc<CryptoProvider>);

    impl ServerCertVerifier for NoVerification {
        fn verify_server_cert(
            &self,
            _end_entity: &CertificateDer<'_>,
            _intermediates: &[CertificateDer<'_>],
            _server_name: &ServerName<'_>,
            _ocsp_response: &[u8],
            _now: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_named_from_the_libraries_texts() {
        for (text, starts) in [
            ("invalid peer certificate: UnknownIssuer", "unknown issuer"),
            (
                "io error: invalid peer certificate: certificate not valid for name \"db\"; certificate is only valid for DnsName(\"x\")",
                "name mismatch",
            ),
            (
                "invalid peer certificate: certificate expired: verification time 1 (UNIX), but certificate is not valid after 0 (1 seconds ago)",
                "expired",
            ),
            (
                "invalid peer certificate: certificate not valid for name \"127.0.0.1\"; certificate is not valid for any names (according to its subjectAltName extension)",
                "name mismatch: the server's certificate names no host",
            ),
            ("received fatal alert: CertificateRequired", "handshake refused"),
            (
                "received corrupt message of type InvalidContentType",
                "handshake failed",
            ),
            (
                "Server error: `ERROR 28000 (1045): Access denied for user 'x'@'y'`",
                "authentication refused",
            ),
        ] {
            let got = refusal(text).unwrap_or_else(|| panic!("{text}: not a refusal"));
            assert!(got.starts_with(starts), "{text}: {got}");
            assert_eq!(explain(text), format!("{got} ({text})"));
            assert_eq!(explain(&explain(text)), explain(text), "idempotent");
        }
        assert_eq!(refusal("Connection refused (os error 111)"), None);
        assert_eq!(explain("timed out"), "timed out");
    }

    #[test]
    fn ssl_modes_are_mysqls_own() {
        assert_eq!(SslMode::parse("disabled"), Some(SslMode::Disabled));
        assert_eq!(SslMode::parse("PREFERRED"), Some(SslMode::Preferred));
        assert_eq!(SslMode::parse("required"), Some(SslMode::Required));
        assert_eq!(SslMode::parse("verify-ca"), Some(SslMode::VerifyCa));
        assert_eq!(
            SslMode::parse("verify_identity"),
            Some(SslMode::VerifyIdentity)
        );
        assert_eq!(SslMode::parse("on"), None);
        assert_eq!(SslMode::parse(""), None);
    }
}
