//! Certificates for a mesh: a CA of its own and certificates it signs,
//! for `trainctl up --tls`, `trainctl certs init` and the tests.
//!
//! Every certificate is good for both ends of a connection (server and
//! client authentication), so one identity per process serves TLS and
//! shows itself to peers that require mutual TLS. Keys are ECDSA P-256.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use chrono::Datelike as _;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// What every local certificate names: a server on this machine is
/// reached as `localhost`, `127.0.0.1` or `::1` (and a `file:` endpoint is
/// checked as `localhost`).
pub const LOCAL_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// Where `trainctl up --tls` keeps the local mesh's certificates.
pub fn local_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("tls")
}

/// The CA trainctl trusts without `--tls-ca`: the local mesh's, when it
/// serves TLS.
pub fn local_ca(data_dir: &Path) -> PathBuf {
    local_dir(data_dir).join("ca.crt")
}

/// Years a certificate is valid, counted from the start of this year.
const VALID_YEARS: i32 = 5;

/// A CA that signs certificates.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

/// A certificate and its private key, PEM.
pub struct Pair {
    pub cert: String,
    pub key: String,
}

impl Ca {
    /// A new CA named `name`.
    pub fn generate(name: &str) -> anyhow::Result<(Ca, Pair)> {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        set_validity(&mut params);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        let pair = Pair {
            cert: cert.pem(),
            key: key.serialize_pem(),
        };
        let ca = Ca {
            issuer: Issuer::new(params, key),
            cert_pem: pair.cert.clone(),
        };
        Ok((ca, pair))
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A certificate for `common_name`, valid for `names` (DNS names or IP
    /// addresses), for servers and clients alike.
    pub fn issue(&self, common_name: &str, names: &[String]) -> anyhow::Result<Pair> {
        let mut params = CertificateParams::new(names.to_vec())
            .map_err(|e| anyhow::anyhow!("invalid certificate name in {names:?}: {e}"))?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Pair {
            cert: cert.pem(),
            key: key.serialize_pem(),
        })
    }
}

fn set_validity(params: &mut CertificateParams) {
    let year = chrono::Utc::now().year();
    params.not_before = rcgen::date_time_ymd(year, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + VALID_YEARS, 1, 1);
}

/// [`LOCAL_NAMES`] and then `extra`, without repeats.
pub fn names_with_local(extra: &[String]) -> Vec<String> {
    let mut names: Vec<String> = LOCAL_NAMES.iter().map(|s| s.to_string()).collect();
    for n in extra {
        if !names.contains(n) {
            names.push(n.clone());
        }
    }
    names
}

/// Writes `DIR/STEM.crt` and `DIR/STEM.key` (the key readable by its owner
/// only); returns their paths.
pub fn write_pair(dir: &Path, stem: &str, pair: &Pair) -> anyhow::Result<(PathBuf, PathBuf)> {
    let cert = dir.join(format!("{stem}.crt"));
    let key = dir.join(format!("{stem}.key"));
    write_file(&cert, &pair.cert, 0o644)?;
    write_file(&key, &pair.key, 0o600)?;
    Ok((cert, key))
}

/// Writes through a temporary file and a rename, so a reader never sees
/// half a certificate.
pub fn write_file(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", tmp.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    Ok(())
}

/// The names `certs init` issues certificates for when given none: the
/// binaries, as Kubernetes Services and compose services call them.
pub const DEFAULT_NAMES: [&str; 5] = [
    "job-service",
    "scheduler-service",
    "metrics-service",
    "diagnosis-service",
    "runner",
];

/// `trainctl certs init DIR [NAME[,ALIAS...]...]`: DIR/ca.crt and
/// DIR/ca.key, and DIR/NAME.crt and DIR/NAME.key for every NAME, valid for
/// NAME, its aliases, the `--san`s and [`LOCAL_NAMES`]. Kept when DIR/ca.crt exists, like
/// `tokens init` keeps its files.
pub fn command(args: &crate::cli::CertsArgs) -> anyhow::Result<u8> {
    let crate::cli::CertsAction::Init { dir, names, sans } = &args.action;
    std::fs::create_dir_all(dir)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
    let ca_path = dir.join("ca.crt");
    if ca_path.exists() {
        println!(
            "kept {} and the certificates beside it (remove it to generate new ones)",
            ca_path.display()
        );
        return Ok(0);
    }
    let names: Vec<String> = if names.is_empty() {
        DEFAULT_NAMES.iter().map(|s| s.to_string()).collect()
    } else {
        names.clone()
    };
    let (ca, ca_pair) = Ca::generate("trainmesh CA")?;
    for spec in &names {
        // NAME[,ALIAS...]: replicas behind one alias each have their own
        // certificate, valid for the alias too.
        let mut valid_for: Vec<String> = spec.split(',').map(str::to_owned).collect();
        let name = valid_for[0].clone();
        anyhow::ensure!(
            !name.is_empty() && !name.contains('/'),
            "`{spec}`: expected NAME[,ALIAS...], NAME without `/`"
        );
        valid_for.extend(sans.iter().cloned());
        let pair = ca.issue(&name, &names_with_local(&valid_for))?;
        let (cert, key) = write_pair(dir, &name, &pair)?;
        println!("wrote {} and {}", cert.display(), key.display());
    }
    // The CA last: a run cut short leaves no ca.crt, so the next one
    // starts over instead of keeping half a set.
    let (cert, key) = write_pair(dir, "ca", &ca_pair)?;
    println!("wrote {} and {}", cert.display(), key.display());
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_names_come_first_and_once() {
        let names = names_with_local(&["job-service".into(), "localhost".into()]);
        assert_eq!(names, ["localhost", "127.0.0.1", "::1", "job-service"]);
    }

    #[test]
    fn issued_certificates_parse_as_a_server_identity() {
        let (ca, _) = Ca::generate("test CA").unwrap();
        let pair = ca.issue("svc", &names_with_local(&[])).unwrap();
        trainmesh_common::tls::ServerTls::from_pem(
            pair.cert.as_bytes(),
            pair.key.as_bytes(),
            Some(ca.cert_pem().as_bytes()),
        )
        .unwrap();
    }

    #[test]
    fn init_writes_one_pair_per_name_and_keeps_an_existing_set() {
        use clap::Parser;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap();
        let init = |extra: &[&str]| {
            let mut argv = vec!["trainctl", "certs", "init", d];
            argv.extend_from_slice(extra);
            match crate::cli::Cli::try_parse_from(argv).unwrap().command {
                crate::cli::Command::Certs(a) => command(&a).unwrap(),
                _ => unreachable!(),
            }
        };
        init(&["job-service", "scheduler-1,scheduler", "--san", "x.example"]);
        let listed = |dir: &Path| {
            let mut names: Vec<String> = std::fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        };
        assert_eq!(
            listed(dir.path()),
            [
                "ca.crt",
                "ca.key",
                "job-service.crt",
                "job-service.key",
                "scheduler-1.crt",
                "scheduler-1.key"
            ]
        );
        let ca = std::fs::read(dir.path().join("ca.crt")).unwrap();
        init(&["other"]);
        assert_eq!(std::fs::read(dir.path().join("ca.crt")).unwrap(), ca);
        assert!(!dir.path().join("other.crt").exists());
    }

    #[test]
    fn keys_are_readable_by_their_owner_only() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let (ca, _) = Ca::generate("test CA").unwrap();
        let pair = ca.issue("svc", &names_with_local(&[])).unwrap();
        let (cert, key) = write_pair(dir.path(), "svc", &pair).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&key), 0o600);
        assert_eq!(mode(&cert), 0o644);
    }
}
