//! `trainctl up --tls`: a CA and a certificate for the local mesh, new at
//! every start, in DATA_DIR/tls. Nothing outlives the mesh that would need
//! the old ones: clients read DATA_DIR/tls/ca.crt at each run, and the CA's
//! key is never written.

use trainmesh_common::tls::ClientTls;

use super::plan::Layout;
use crate::certs::{names_with_local, write_file, write_pair, Ca};
use crate::cli::UpArgs;

/// Writes the certificates with `--tls` and returns how `up` itself
/// connects to the services. Without `--tls` removes DATA_DIR/tls, so that
/// trainctl does not go on trusting a CA that nothing serves with.
pub fn prepare(args: &UpArgs, layout: &Layout) -> anyhow::Result<ClientTls> {
    if !args.tls {
        match std::fs::remove_dir_all(&layout.tls) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(anyhow::anyhow!(
                    "cannot remove {}: {e}",
                    layout.tls.display()
                ))
            }
            _ => return Ok(ClientTls::default()),
        }
    }
    std::fs::create_dir_all(&layout.tls)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", layout.tls.display()))?;
    let (ca, _) = Ca::generate("trainmesh local CA")?;
    let mut names = Vec::new();
    if !matches!(args.bind_host.as_str(), "" | "0.0.0.0" | "::" | "[::]") {
        names.push(args.bind_host.trim_matches(['[', ']']).to_owned());
    }
    let server = ca.issue("trainmesh local", &names_with_local(&names))?;
    write_pair(&layout.tls, "server", &server)?;
    // The CA last: trainctl trusts it as soon as it exists.
    write_file(&layout.tls_ca(), ca.cert_pem(), 0o644)?;
    Ok(ClientTls::from_pem(ca.cert_pem().as_bytes(), None))
}
