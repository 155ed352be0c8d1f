//! Who calls the service: the callers of `RESTOCK_CALLERS` (a TOML file), each with a
//! name, the identities it proves itself by (client certificate identities, SHA-256s
//! of bearer tokens) and its roles. Read and checked at start, so a mistake stops the
//! service naming the file, the caller and the field; read again on SIGHUP, when a
//! mistake is refused and the policy in force stays. Also which proxies are believed
//! about the client's address ([`proxies`]).

pub mod proxies;

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use secrecy::{ExposeSecret as _, SecretString};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;
use tokio::sync::watch;

pub use proxies::TrustedProxies;

/// What a caller may do. Each role includes the ones before it: `write` can read, and
/// `admin` can do everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    Read,
    Write,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Write => "write",
            Role::Admin => "admin",
        }
    }

    fn parse(name: &str) -> Option<Self> {
        match name {
            "read" => Some(Role::Read),
            "write" => Some(Role::Write),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// A caller the policy knows.
#[derive(Debug, PartialEq, Eq)]
pub struct Caller {
    /// In logs, audit lines and the API rate limit's key.
    pub name: String,
    roles: BTreeSet<Role>,
}

impl Caller {
    /// Whether the caller holds `role`, or one that includes it.
    pub fn may(&self, role: Role) -> bool {
        self.roles.iter().any(|held| *held >= role)
    }
}

/// The caller of a request, once the authorization layer let it through: `None` for an anonymous
/// call to an open API (no `RESTOCK_CALLERS`).
#[derive(Debug, Clone)]
pub struct CallerOf(pub Option<Arc<Caller>>);

impl CallerOf {
    /// The caller's name for logs and audit lines: `anonymous` without one.
    pub fn name(&self) -> &str {
        self.0.as_ref().map_or("anonymous", |c| c.name.as_str())
    }
}

/// The client's address: the peer's, or the one a trusted proxy forwarded for.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub IpAddr);

/// The name of the caller that `RESTOCK_ADMIN_TOKEN` stands for.
pub const ADMIN_TOKEN_CALLER: &str = "admin-token";

/// The callers in force: who each identity and token is.
#[derive(Debug, Default)]
pub struct Policy {
    /// `false` without `RESTOCK_CALLERS`: every RPC but the admin ones is open to
    /// anyone, as before callers were known.
    pub enforced: bool,
    by_identity: HashMap<String, Arc<Caller>>,
    /// SHA-256 of each token, with its caller. Few enough to compare each in constant
    /// time, so that how long a refusal takes says nothing about the tokens held.
    tokens: Vec<([u8; 32], Arc<Caller>)>,
}

impl Policy {
    /// The open policy (no file): only the admin token's caller is known.
    pub fn open(admin_token: &SecretString) -> Self {
        let mut policy = Policy::default();
        policy.add_admin_token(admin_token);
        policy
    }

    /// The caller a client certificate with `identities` is, if any: the first
    /// identity the policy knows, in the order given (URI SAN, DNS SANs, subject CN).
    pub fn by_certificate(&self, identities: &[String]) -> Option<Arc<Caller>> {
        identities
            .iter()
            .find_map(|identity| self.by_identity.get(identity).cloned())
    }

    /// The caller a bearer token is, if any, compared by its SHA-256 in constant time.
    pub fn by_token(&self, token: &str) -> Option<Arc<Caller>> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        for (held, caller) in &self.tokens {
            if bool::from(held.ct_eq(&digest)) {
                found = Some(caller.clone());
            }
        }
        found
    }

    /// Whether a caller named `name` with at least `role` is still known.
    pub fn still_may(&self, name: &str, role: Role) -> bool {
        let known = |caller: &Arc<Caller>| caller.name == name && caller.may(role);
        self.by_identity.values().any(known) || self.tokens.iter().any(|(_, c)| known(c))
    }

    fn add_admin_token(&mut self, admin_token: &SecretString) {
        let caller = Arc::new(Caller {
            name: ADMIN_TOKEN_CALLER.into(),
            roles: BTreeSet::from([Role::Admin]),
        });
        let digest = Sha256::digest(admin_token.expose_secret().as_bytes()).into();
        self.tokens.push((digest, caller));
    }

    /// Parses and checks the text of `file`; the admin token is one more caller.
    pub fn parse(file: &Path, text: &str, admin_token: &SecretString) -> Result<Self, PolicyError> {
        let shown = file.display().to_string();
        let parsed: File = toml::from_str(text).map_err(|e| PolicyError::Syntax {
            file: shown.clone(),
            why: e.message().to_string(),
        })?;
        let mut policy = Policy {
            enforced: true,
            ..Policy::default()
        };
        let mut names = BTreeSet::new();
        for entry in parsed.caller {
            let refused = |field: &str, why: String| PolicyError::Caller {
                file: shown.clone(),
                caller: entry.name.clone(),
                field: field.to_string(),
                why,
            };
            let caller = Arc::new(entry.checked(&refused)?);
            if caller.name == ADMIN_TOKEN_CALLER || !names.insert(caller.name.clone()) {
                return Err(refused("name", "is taken by another caller".into()));
            }
            for identity in &entry.certificate {
                if policy
                    .by_identity
                    .insert(identity.clone(), caller.clone())
                    .is_some()
                {
                    let why = format!("{identity:?} is another caller's too");
                    return Err(refused("certificate", why));
                }
            }
            for token in &entry.token_sha256 {
                let digest = parse_digest(token).ok_or_else(|| {
                    refused("token_sha256", "is not 64 hexadecimal digits".into())
                })?;
                if policy.tokens.iter().any(|(held, _)| *held == digest) {
                    return Err(refused("token_sha256", "is another caller's too".into()));
                }
                policy.tokens.push((digest, caller.clone()));
            }
        }
        policy.add_admin_token(admin_token);
        Ok(policy)
    }

    /// Reads and checks `file`.
    pub fn read(file: &Path, admin_token: &SecretString) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(file).map_err(|e| PolicyError::Unreadable {
            file: file.display().to_string(),
            why: e.to_string(),
        })?;
        Self::parse(file, &text, admin_token)
    }
}

/// Why a policy file was refused: each names the file, and the caller and field where
/// there is one.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("RESTOCK_CALLERS {file} cannot be read: {why}")]
    Unreadable { file: String, why: String },
    #[error("RESTOCK_CALLERS {file} is not a valid callers file: {why}")]
    Syntax { file: String, why: String },
    #[error("RESTOCK_CALLERS {file}: caller {caller:?}: {field} {why}")]
    Caller {
        file: String,
        caller: String,
        field: String,
        why: String,
    },
}

/// The file as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    caller: Vec<Entry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: String,
    #[serde(default)]
    certificate: Vec<String>,
    #[serde(default)]
    token_sha256: Vec<String>,
    #[serde(default)]
    roles: Vec<String>,
}

impl Entry {
    /// The caller this entry names, once its name, roles and identities are usable.
    fn checked(
        &self,
        refused: &dyn Fn(&str, String) -> PolicyError,
    ) -> Result<Caller, PolicyError> {
        if self.name.trim().is_empty() || self.name.len() > MAX_NAME {
            let why = format!("must be 1 to {MAX_NAME} characters");
            return Err(refused("name", why));
        }
        if self.certificate.is_empty() && self.token_sha256.is_empty() {
            let why = "names no way to prove it: give certificate or token_sha256".into();
            return Err(refused("certificate", why));
        }
        if self.certificate.iter().any(|id| id.trim().is_empty()) {
            return Err(refused("certificate", "holds an empty identity".into()));
        }
        if self.roles.is_empty() {
            return Err(refused(
                "roles",
                "is empty: give read, write or admin".into(),
            ));
        }
        let mut roles = BTreeSet::new();
        for role in &self.roles {
            let role = Role::parse(role).ok_or_else(|| {
                refused(
                    "roles",
                    format!("has {role:?}: the roles are read, write and admin"),
                )
            })?;
            roles.insert(role);
        }
        Ok(Caller {
            name: self.name.clone(),
            roles,
        })
    }
}

/// The longest caller name: it is a log field and a rate limit key.
const MAX_NAME: usize = 64;

fn parse_digest(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut digest = [0u8; 32];
    for (i, byte) in digest.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(digest)
}

/// The policy in force, replaced as a whole when the file is read again; streams watch
/// `changed` to end for a caller who lost access.
pub struct Callers {
    current: RwLock<Arc<Policy>>,
    changed: watch::Sender<u64>,
    file: Option<PathBuf>,
    admin_token: SecretString,
}

impl Callers {
    /// The policy of `file` (`RESTOCK_CALLERS`), or the open one without it.
    pub fn load(file: Option<&Path>, admin_token: SecretString) -> Result<Self, PolicyError> {
        let policy = match file {
            Some(file) => Policy::read(file, &admin_token)?,
            None => Policy::open(&admin_token),
        };
        Ok(Self {
            current: RwLock::new(Arc::new(policy)),
            changed: watch::Sender::new(0),
            file: file.map(Path::to_path_buf),
            admin_token,
        })
    }

    pub fn policy(&self) -> Arc<Policy> {
        self.current.read().unwrap().clone()
    }

    /// Told each time a policy is put in force.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Reads the file again: a valid one is in force for the next call; an invalid one
    /// is refused, and the policy in force stays.
    pub fn reload(&self) -> Result<(), PolicyError> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        let policy = Policy::read(file, &self.admin_token)?;
        *self.current.write().unwrap() = Arc::new(policy);
        self.changed.send_modify(|version| *version += 1);
        Ok(())
    }

    /// Reloads on every SIGHUP until the process ends.
    pub fn reload_on_hangup(self: &Arc<Self>) -> std::io::Result<()> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let mut hangups = signal(SignalKind::hangup())?;
            let callers = Arc::downgrade(self);
            tokio::spawn(async move {
                while hangups.recv().await.is_some() {
                    let Some(callers) = callers.upgrade() else {
                        return;
                    };
                    match callers.reload() {
                        Ok(()) => tracing::info!("SIGHUP: callers read again and in force"),
                        Err(err) => tracing::error!(
                            error = %err,
                            "SIGHUP: callers file refused; the policy in force stays"
                        ),
                    }
                }
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token_hash(token: &str) -> String {
        Sha256::digest(token.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn parse(text: &str) -> Result<Policy, PolicyError> {
        Policy::parse(Path::new("callers.toml"), text, &"admin".to_string().into())
    }

    #[test]
    fn a_policy_knows_its_callers_by_certificate_and_token() {
        let text = format!(
            "[[caller]]\nname = \"inventory\"\ncertificate = [\"spiffe://shop/inventory\"]\n\
             roles = [\"write\"]\n\n[[caller]]\nname = \"support\"\n\
             token_sha256 = [\"{}\"]\nroles = [\"read\"]\n",
            token_hash("s3cret")
        );
        let policy = parse(&text).unwrap();
        let inventory = policy
            .by_certificate(&["other".into(), "spiffe://shop/inventory".into()])
            .unwrap();
        assert_eq!(inventory.name, "inventory");
        assert!(inventory.may(Role::Read) && inventory.may(Role::Write));
        assert!(!inventory.may(Role::Admin));
        let support = policy.by_token("s3cret").unwrap();
        assert!(support.may(Role::Read) && !support.may(Role::Write));
        assert!(policy.by_token("wrong").is_none());
        assert!(policy.by_token("admin").unwrap().may(Role::Admin));
    }

    #[test]
    fn a_bad_file_is_refused_naming_the_caller_and_field() {
        let cases = [
            (
                "[[caller]]\nname = \"a\"\ncertificate = [\"x\"]\nroles = [\"wrte\"]\n",
                "roles",
            ),
            (
                "[[caller]]\nname = \"a\"\nroles = [\"read\"]\n",
                "certificate",
            ),
            (
                "[[caller]]\nname = \"a\"\ntoken_sha256 = [\"abc\"]\nroles = [\"read\"]\n",
                "token_sha256",
            ),
            (
                "[[caller]]\nname = \"a\"\ncertificate = [\"x\"]\nroles = []\n",
                "roles",
            ),
            (
                "[[caller]]\nname = \"a\"\ncertificate = [\"x\"]\nroles = [\"read\"]\n\
                 [[caller]]\nname = \"a\"\ncertificate = [\"y\"]\nroles = [\"read\"]\n",
                "name",
            ),
            (
                "[[caller]]\nname = \"a\"\ncertificate = [\"x\"]\nroles = [\"read\"]\n\
                 [[caller]]\nname = \"b\"\ncertificate = [\"x\"]\nroles = [\"read\"]\n",
                "certificate",
            ),
        ];
        for (text, field) in cases {
            match parse(text) {
                Err(PolicyError::Caller { field: got, .. }) => assert_eq!(got, field, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
        assert!(matches!(
            parse("[[caller]]\nname = \"a\"\nrole = [\"read\"]\n"),
            Err(PolicyError::Syntax { .. })
        ));
    }
}
