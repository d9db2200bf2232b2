//! A mesh's certificates: one CA, and one identity that every service and
//! runner serves and shows its peers (mutual TLS), as does the harness's
//! own client.

use std::path::{Path, PathBuf};

use trainctl::certs::{names_with_local, write_file, write_pair, Ca};
use trainmesh_common::tls::ClientTls;

/// Set to `1` to start every [`crate::Mesh`] with TLS
/// ([`crate::MeshOptions::tls`]), so that the whole suite runs over TLS.
pub const TLS_ENV: &str = "TRAINMESH_TEST_TLS";

/// Whether [`TLS_ENV`] asks for TLS.
pub fn tls_from_env() -> bool {
    std::env::var(TLS_ENV).is_ok_and(|v| !matches!(v.trim(), "" | "0" | "false"))
}

#[derive(Clone, Debug)]
pub struct MeshTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    client: ClientTls,
}

impl MeshTls {
    /// A new CA and identity (for localhost, 127.0.0.1 and ::1) in `dir`.
    pub fn generate(dir: &Path) -> MeshTls {
        std::fs::create_dir_all(dir).expect("tls dir");
        let (ca, _) = Ca::generate("trainmesh test CA").expect("CA");
        let pair = ca
            .issue("trainmesh test", &names_with_local(&[]))
            .expect("certificate");
        let (cert, key) = write_pair(dir, "mesh", &pair).expect("write certificate");
        let ca_path = dir.join("ca.crt");
        write_file(&ca_path, ca.cert_pem(), 0o644).expect("write CA");
        let client = ClientTls::from_pem(
            ca.cert_pem().as_bytes(),
            Some((pair.cert.as_bytes(), pair.key.as_bytes())),
        );
        MeshTls {
            ca: ca_path,
            cert,
            key,
            client,
        }
    }

    /// How the harness's clients connect: trusting the CA, showing the
    /// mesh's identity.
    pub fn client(&self) -> &ClientTls {
        &self.client
    }

    /// The variables that make a trainmesh binary serve TLS, require client
    /// certificates from this CA, and call its peers with this identity.
    pub fn env(&self) -> Vec<(String, String)> {
        let path = |p: &Path| p.display().to_string();
        [
            ("TRAINMESH_TLS_CERT", path(&self.cert)),
            ("TRAINMESH_TLS_KEY", path(&self.key)),
            ("TRAINMESH_TLS_CLIENT_CA", path(&self.ca)),
            ("TRAINMESH_TLS_CA", path(&self.ca)),
            ("TRAINMESH_TLS_CLIENT_CERT", path(&self.cert)),
            ("TRAINMESH_TLS_CLIENT_KEY", path(&self.key)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}
