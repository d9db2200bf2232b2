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
    /// One of the four trainmesh services; the token's user names which
    /// ([`service`]). Each internal RPC accepts only the service that owns
    /// the call.
    Service,
    /// A runner; the token's user is the runner's name. It may act only as
    /// that runner and only for the attempts placed on it.
    Runner,
    /// A join token: it may only trade a runner's name for that runner's
    /// own credential (`TokenService.JoinRunner`), once per name.
    Join,
}

impl Role {
    pub const ALL: [Role; 6] = [
        Role::User,
        Role::Approver,
        Role::Admin,
        Role::Service,
        Role::Runner,
        Role::Join,
    ];

    /// "user, approver, admin, service, runner", for error messages.
    pub fn names() -> String {
        Self::ALL.map(Role::as_str).join(", ")
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s.trim() {
            "user" => Some(Role::User),
            "approver" => Some(Role::Approver),
            "admin" => Some(Role::Admin),
            "service" => Some(Role::Service),
            "runner" => Some(Role::Runner),
            "join" => Some(Role::Join),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Approver => "approver",
            Role::Admin => "admin",
            Role::Service => "service",
            Role::Runner => "runner",
            Role::Join => "join",
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

/// The names service credentials carry as their user: each service calls
/// its peers as itself, and each internal RPC names the one service that
/// may call it.
pub mod service {
    pub const JOB: &str = "job-service";
    pub const SCHEDULER: &str = "scheduler-service";
    pub const METRICS: &str = "metrics-service";
    pub const DIAGNOSIS: &str = "diagnosis-service";
    pub const ALL: [&str; 4] = [JOB, SCHEDULER, METRICS, DIAGNOSIS];
}

impl Caller {
    /// Admins hold every human role; `service`, `runner` and `join` are
    /// never implied.
    pub fn has(&self, role: Role) -> bool {
        self.roles.contains(&role)
            || (matches!(role, Role::User | Role::Approver) && self.roles.contains(&Role::Admin))
    }

    /// May read any user's jobs (and change them, for admins; a service
    /// changes jobs only through the internal RPC it owns).
    pub fn sees_everything(&self) -> bool {
        self.has(Role::Admin) || self.has(Role::Service)
    }

    /// The runner this caller is, when it is one.
    pub fn runner(&self) -> Option<&str> {
        self.has(Role::Runner).then_some(self.user.as_str())
    }

    /// Only a person (a `user`, `approver` or `admin` token) may make this
    /// call: services and runners read jobs but never submit or change
    /// them through the public API.
    pub fn require_person(&self) -> Result<(), Status> {
        if self.has(Role::User) || self.has(Role::Approver) {
            Ok(())
        } else {
            Err(Status::permission_denied(format!(
                "this call is for people (a token with the `user` role); `{}` is a service, a \
                 runner or a join token",
                self.user
            )))
        }
    }

    /// Only the service `name` may make this call.
    pub fn require_service(&self, name: &str) -> Result<(), Status> {
        if self.has(Role::Service) && self.user == name {
            Ok(())
        } else {
            Err(Status::permission_denied(format!(
                "only {name} may make this call; `{}` may not",
                self.user
            )))
        }
    }

    /// Only a runner may make this call; returns its name.
    pub fn require_runner(&self) -> Result<&str, Status> {
        self.runner().ok_or_else(|| {
            Status::permission_denied(format!(
                "only a runner (a token with the `runner` role) may make this call; `{}` is not one",
                self.user
            ))
        })
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
        assert!(admin.require_runner().is_err());
        assert!(admin.require_service(service::JOB).is_err());
    }

    #[test]
    fn a_service_may_only_make_its_own_calls() {
        let scheduler = Caller {
            user: service::SCHEDULER.into(),
            org: "system".into(),
            roles: vec![Role::Service],
        };
        assert!(scheduler.require_service(service::SCHEDULER).is_ok());
        let err = scheduler.require_service(service::JOB).unwrap_err();
        assert!(err.message().contains("only job-service"), "{err:?}");
        assert!(scheduler.require_runner().is_err());
        // A runner named like a service is still not that service.
        let runner = Caller {
            user: service::JOB.into(),
            org: "system".into(),
            roles: vec![Role::Runner],
        };
        assert!(runner.require_service(service::JOB).is_err());
        assert_eq!(runner.require_runner().unwrap(), service::JOB);
        assert!(!runner.sees_everything());
    }
}
