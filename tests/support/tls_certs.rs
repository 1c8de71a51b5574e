//! Certificates made in the test, with rcgen: a private certificate authority and the server
//! and client certificates it signs, written as PEM files to a directory of their own (what
//! the worker's `*_CA_FILE` settings, RabbitMQ and Postgres read). Nothing is shared with the
//! machine's trust store, so "without our CA" really means untrusted.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// A certificate and its private key, as PEM files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM, PKCS#8).
    pub key: PathBuf,
}

/// A throw-away certificate authority and the directory its files live in (removed on drop).
pub struct TestCa {
    dir: PathBuf,
    ca_file: PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

impl TestCa {
    /// A new CA called `name`, its certificate written to `<dir>/<name>-ca.pem`.
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "tt-pki-{name}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ));
        std::fs::create_dir_all(&dir).expect("certificate directory");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("tenant-tokens test CA {name}"));
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
        ];
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA certificate");
        let ca_file = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&ca_file, cert.pem()).expect("write CA certificate");
        Self {
            dir,
            ca_file,
            issuer: Issuer::new(params, key),
        }
    }

    /// The CA certificate (PEM), what a client trusts.
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    /// The directory holding every file of this CA.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A server certificate for `hosts` (DNS names or IP addresses), signed by this CA.
    pub fn server(&self, file_name: &str, hosts: &[&str]) -> CertFiles {
        self.leaf(file_name, hosts, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate with common name `name`, signed by this CA.
    pub fn client(&self, name: &str) -> CertFiles {
        self.leaf(name, &[name], ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn leaf(&self, file_name: &str, names: &[&str], usage: ExtendedKeyUsagePurpose) -> CertFiles {
        let sans: Vec<String> = names.iter().map(|h| (*h).to_owned()).collect();
        let mut params = CertificateParams::new(sans).expect("certificate parameters");
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().copied().unwrap_or(file_name),
        );
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().expect("leaf key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("sign certificate");
        let files = CertFiles {
            cert: self.dir.join(format!("{file_name}.pem")),
            key: self.dir.join(format!("{file_name}.key")),
        };
        std::fs::write(&files.cert, cert.pem()).expect("write certificate");
        std::fs::write(&files.key, key.serialize_pem()).expect("write key");
        files
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
