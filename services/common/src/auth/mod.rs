//! Bearer-token authentication.
//!
//! Tokens map to a [`Caller`] (user, org, roles). Only SHA-256 hashes of
//! tokens are stored, in two kinds of source ([`TokenStore`]):
//! - YAML tokens files (what `trainctl up` and `trainctl tokens init`
//!   write): the bootstrap admin and the services, read at start;
//! - a token database ([`managed`]): tokens created, listed and revoked
//!   through `TokenService` without a restart, with expiry. Every service
//!   polls it, so changes reach all of them within a second.
//!
//! The [`AuthLayer`] rejects calls without a valid token, except health
//! checks and reflection, which probes and `grpcurl list` need without
//! credentials.

#[cfg(test)]
mod db_tests;
mod layer;
pub mod managed;
mod store;

use std::path::Path;

pub use layer::{AuthLayer, AuthService};
pub use store::{Refusal, TokenStore, RELOAD_INTERVAL};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tonic::Status;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Approver,
    Admin,
    /// Other trainmesh services and runners: internal RPCs only accept this.
    Service,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::User, Role::Approver, Role::Admin, Role::Service];

    pub fn parse(s: &str) -> Option<Role> {
        match s.trim() {
            "user" => Some(Role::User),
            "approver" => Some(Role::Approver),
            "admin" => Some(Role::Admin),
            "service" => Some(Role::Service),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Approver => "approver",
            Role::Admin => "admin",
            Role::Service => "service",
        }
    }
}

/// The authenticated identity of a request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caller {
    pub user: String,
    pub org: String,
    pub roles: Vec<Role>,
}

impl Caller {
    /// Admins hold every human role; `service` is never implied.
    pub fn has(&self, role: Role) -> bool {
        self.roles.contains(&role) || (role != Role::Service && self.roles.contains(&Role::Admin))
    }

    /// May read and change any user's jobs.
    pub fn sees_everything(&self) -> bool {
        self.has(Role::Admin) || self.has(Role::Service)
    }

    pub fn require(&self, role: Role) -> Result<(), Status> {
        if self.has(role) {
            Ok(())
        } else {
            Err(Status::permission_denied(format!(
                "this call needs the `{}` role; `{}` does not have it",
                role.as_str(),
                self.user
            )))
        }
    }
}

/// The caller of a request that passed the [`AuthLayer`].
pub fn caller<T>(req: &tonic::Request<T>) -> Result<Caller, Status> {
    req.extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no authenticated caller"))
}

pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.trim().as_bytes()))
}

/// A new random token (256 bits), prefixed so it is recognisable in leaks.
pub fn generate_token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    format!("tm_{}", hex::encode(bytes))
}

/// One entry of a tokens file.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenEntry {
    pub user: String,
    #[serde(default = "default_org")]
    pub org: String,
    pub roles: Vec<Role>,
    /// Hex SHA-256 of the token.
    pub sha256: String,
}

fn default_org() -> String {
    "default".into()
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct TokensFile {
    pub tokens: Vec<TokenEntry>,
}

impl TokensFile {
    /// Adds `token` for the caller (hashing it) and returns `self`.
    pub fn with(mut self, token: &str, user: &str, org: &str, roles: &[Role]) -> Self {
        self.tokens.push(TokenEntry {
            user: user.into(),
            org: org.into(),
            roles: roles.to_vec(),
            sha256: hash_token(token),
        });
        self
    }

    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        let text = serde_yaml::to_string(self)?;
        std::fs::write(path, text)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_implies_human_roles_not_service() {
        let admin = Caller {
            user: "a".into(),
            org: "o".into(),
            roles: vec![Role::Admin],
        };
        assert!(admin.has(Role::Approver));
        assert!(!admin.has(Role::Service));
        assert!(admin.require(Role::Service).is_err());
    }
}
