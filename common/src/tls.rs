//! Mutual TLS between Mortar's clients and bricks (see SECURITY.md).
//!
//! Every peer shows a certificate signed by the cluster's own CA, and checks the other's. A
//! TLS directory holds `ca.crt`, `tls.crt` and `tls.key`: the layout of a Kubernetes TLS
//! Secret with its CA. A certificate's common name says who holds it — `brick/<id>`,
//! `admin/<name>` or `client/<name>` — and a brick checks that role before an
//! administrative request.
//!
//! A process is one peer of the cluster with one identity: the client side is configured
//! once per process (`init_client`, else `MORTAR_TLS_DIR`), and every connection to a brick
//! uses it.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, Result, bail};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

pub const CA_FILE: &str = "ca.crt";
pub const CERT_FILE: &str = "tls.crt";
pub const KEY_FILE: &str = "tls.key";
/// The CA's private key, next to its `ca.crt` (kept off the bricks).
pub const CA_KEY_FILE: &str = "ca.key";
/// The name every brick certificate carries and every client checks, whatever address the
/// brick is reached at (pod IPs change; the CA is the cluster's own).
pub const BRICK_SERVER_NAME: &str = "mortar-brick";
/// How long a brick waits for a new connection's TLS handshake.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Environment variable naming the TLS directory, for every Mortar program.
pub const TLS_DIR_ENV: &str = "MORTAR_TLS_DIR";

/// Who holds a certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A brick (and its self-heal worker): everything.
    Brick,
    /// The CLI's administrative commands, the CSI controller, the operator: everything.
    Admin,
    /// A mount: the file operations, not quotas, heal steps or the heal index.
    Client,
}

impl Role {
    pub fn prefix(self) -> &'static str {
        match self {
            Role::Brick => "brick",
            Role::Admin => "admin",
            Role::Client => "client",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        [Role::Brick, Role::Admin, Role::Client]
            .into_iter()
            .find(|r| r.prefix() == s)
    }

    /// May make administrative changes (quotas, heal steps, the heal index).
    pub fn is_admin(self) -> bool {
        matches!(self, Role::Brick | Role::Admin)
    }

    /// The role a certificate's common name states (`<role>/<name>`).
    pub fn of_common_name(cn: &str) -> Option<Role> {
        Role::parse(cn.split_once('/')?.0)
    }
}

/// The PEM files of one TLS directory.
pub struct TlsFiles {
    pub ca: Vec<u8>,
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
}

impl TlsFiles {
    /// From PEM text held elsewhere than in a directory (a Kubernetes Secret's data): one
    /// process may then speak for several clusters, each with its own CA and certificate.
    pub fn from_pem(
        ca: impl Into<Vec<u8>>,
        cert: impl Into<Vec<u8>>,
        key: impl Into<Vec<u8>>,
    ) -> TlsFiles {
        TlsFiles {
            ca: ca.into(),
            cert: cert.into(),
            key: key.into(),
        }
    }

    pub fn load(dir: &Path) -> Result<TlsFiles> {
        Ok(TlsFiles {
            ca: read_in(dir, CA_FILE)?,
            cert: read_in(dir, CERT_FILE)?,
            key: read_in(dir, KEY_FILE)?,
        })
    }

    /// A brick's side: its own certificate, and only clients with one of the same CA. A
    /// connection that has not finished its handshake within `HANDSHAKE_TIMEOUT` is closed:
    /// idle connections cannot pile up and hold the brick's descriptors.
    pub fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert, &self.key))
            .client_ca_root(Certificate::from_pem(&self.ca))
            .timeout(HANDSHAKE_TIMEOUT)
    }

    /// A client's side: its own certificate, and only bricks with one of the same CA.
    pub fn client(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca))
            .identity(Identity::from_pem(&self.cert, &self.key))
            .domain_name(BRICK_SERVER_NAME)
    }
}

/// How this process connects to bricks: the directory of its certificate (`None`: plain
/// TCP), and what was loaded from it when.
struct ClientTls {
    dir: Option<PathBuf>,
    loaded: Option<(Stamp, ClientTlsConfig)>,
}

/// The size and modification time of each file of a TLS directory: renewed files (a
/// Secret's new data, `mortar certs issue` again) change it.
type Stamp = Vec<Option<(u64, std::time::SystemTime)>>;

fn stamp(dir: &Path) -> Stamp {
    [CA_FILE, CERT_FILE, KEY_FILE]
        .iter()
        .map(|f| {
            let m = std::fs::metadata(dir.join(f)).ok()?;
            Some((m.len(), m.modified().ok()?))
        })
        .collect()
}

static CLIENT: Mutex<Option<ClientTls>> = Mutex::new(None);

/// Sets how this process connects to bricks: with the certificate in `dir`, or (None) in
/// plain TCP. Returns an error if the files do not load, or if it was set already.
pub fn init_client(dir: Option<&Path>) -> Result<()> {
    let loaded = dir
        .map(|d| TlsFiles::load(d).map(|f| (stamp(d), f.client())))
        .transpose()?;
    let mut c = CLIENT.lock().unwrap();
    if c.is_some() {
        bail!("TLS client configuration set twice");
    }
    *c = Some(ClientTls {
        dir: dir.map(Path::to_path_buf),
        loaded,
    });
    Ok(())
}

/// This process's client TLS, set by `init_client` or else from `MORTAR_TLS_DIR` (plain TCP
/// when neither says otherwise). Read again whenever the directory's files change, so that
/// a long-running process (a mount, a brick's self-heal) presents its renewed certificate at
/// its next connection rather than the one it started with.
fn client_config() -> Option<ClientTlsConfig> {
    let mut guard = CLIENT.lock().unwrap();
    let c = guard.get_or_insert_with(|| ClientTls {
        dir: std::env::var_os(TLS_DIR_ENV).map(PathBuf::from),
        loaded: None,
    });
    let dir = c.dir.clone()?;
    let now = stamp(&dir);
    if c.loaded.as_ref().is_some_and(|(s, _)| *s == now) {
        return c.loaded.as_ref().map(|(_, t)| t.clone());
    }
    match TlsFiles::load(&dir) {
        Ok(f) => {
            if c.loaded.is_some() {
                tracing::info!(dir = %dir.display(), "client certificate changed: new connections use the new one");
            }
            c.loaded = Some((now, f.client()));
        }
        // Files caught half-renewed: the last good ones serve until they settle.
        Err(e) if c.loaded.is_some() => {
            tracing::warn!("{e:#}; the certificate loaded before is kept")
        }
        Err(e) => {
            // A process told to use TLS must not quietly fall back to plain TCP: every
            // connection fails, and says why.
            tracing::error!("{e:#}");
            return Some(ClientTlsConfig::new().domain_name("unusable.invalid"));
        }
    }
    c.loaded.as_ref().map(|(_, t)| t.clone())
}

/// Whether connections to bricks use TLS.
pub fn client_uses_tls() -> bool {
    client_config().is_some()
}

/// An endpoint for a brick at `addr` (host:port), with this process's TLS.
pub fn brick_endpoint(addr: &str) -> Result<Endpoint> {
    endpoint_with_config(addr, client_config())
}

/// An endpoint for a brick at `addr` with the client TLS `tls` (a cluster's own, when one
/// process talks to several clusters), or this process's when `None`.
pub fn brick_endpoint_with(addr: &str, tls: Option<&ClientTlsConfig>) -> Result<Endpoint> {
    match tls {
        Some(t) => endpoint_with_config(addr, Some(t.clone())),
        None => brick_endpoint(addr),
    }
}

fn endpoint_with_config(addr: &str, tls: Option<ClientTlsConfig>) -> Result<Endpoint> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let e = Endpoint::from_shared(format!("{scheme}://{addr}"))
        .with_context(|| format!("bad brick address {addr:?}"))?;
    Ok(match tls {
        Some(t) => e.tls_config(t).context("TLS configuration")?,
        None => e,
    })
}

/// The role of a peer from its certificate chain as TLS gave it (the leaf first).
pub fn peer_role(chain: &[impl AsRef<[u8]>]) -> Option<Role> {
    Role::of_common_name(&peer_name(chain)?)
}

/// The common name of a peer's certificate (`client/<name>`, say), from its chain as TLS
/// gave it (the leaf first).
pub fn peer_name(chain: &[impl AsRef<[u8]>]) -> Option<String> {
    let leaf = chain.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
    Some(cn.to_string())
}

/// A certificate authority of a cluster: it issues the certificates of its bricks and
/// clients.
pub struct Ca {
    pub cert_pem: String,
    pub key_pem: String,
}

/// How long issued certificates are valid (the operator renews them well before).
pub const CERT_DAYS: i64 = 365;
/// How long a CA is valid.
pub const CA_DAYS: i64 = 3650;

fn validity(p: &mut rcgen::CertificateParams, days: i64) {
    let now = time::OffsetDateTime::now_utc();
    // A little in the past: peers' clocks differ.
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(days);
}

impl Ca {
    /// A new CA, named after the cluster.
    pub fn generate(cluster: &str) -> Result<Ca> {
        let key = rcgen::KeyPair::generate()?;
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new())?;
        p.distinguished_name
            .push(rcgen::DnType::CommonName, format!("mortar CA {cluster}"));
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut p, CA_DAYS);
        let cert = p.self_signed(&key)?;
        Ok(Ca {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// The CA kept in `dir` (`ca.crt`, `ca.key`).
    pub fn load(dir: &Path) -> Result<Ca> {
        let pem = |f: &str| -> Result<String> {
            String::from_utf8(read_in(dir, f)?).with_context(|| format!("{f}: not PEM text"))
        };
        Ok(Ca {
            cert_pem: pem(CA_FILE)?,
            key_pem: pem(CA_KEY_FILE)?,
        })
    }

    /// Keeps the CA in `dir` (`ca.crt`, `ca.key` readable by the owner only).
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join(CA_FILE), &self.cert_pem)?;
        write_private(&dir.join(CA_KEY_FILE), &self.key_pem)
    }

    /// A certificate for `role`/`name`, valid for both ends of a connection (a brick is a
    /// client of the others when it heals). A brick's also names `BRICK_SERVER_NAME` and
    /// `hosts`. Returns (certificate, key) in PEM.
    pub fn issue(&self, role: Role, name: &str, hosts: &[String]) -> Result<(String, String)> {
        if name.is_empty() || name.contains('/') {
            bail!("certificate name {name:?}: must be non-empty, without '/'");
        }
        let key = rcgen::KeyPair::generate()?;
        let mut sans = Vec::new();
        if role == Role::Brick {
            sans.push(BRICK_SERVER_NAME.to_string());
            sans.extend(hosts.iter().cloned());
        }
        let mut p = rcgen::CertificateParams::new(sans)?;
        p.distinguished_name.push(
            rcgen::DnType::CommonName,
            format!("{}/{name}", role.prefix()),
        );
        p.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        validity(&mut p, CERT_DAYS);
        let ca_key = rcgen::KeyPair::from_pem(&self.key_pem)?;
        let issuer = rcgen::Issuer::from_ca_cert_pem(&self.cert_pem, ca_key)?;
        let cert = p.signed_by(&key, &issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Writes a TLS directory for `role`/`name` into `dir`.
    pub fn write_tls_dir(
        &self,
        dir: &Path,
        role: Role,
        name: &str,
        hosts: &[String],
    ) -> Result<PathBuf> {
        let (cert, key) = self.issue(role, name, hosts)?;
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join(CA_FILE), &self.cert_pem)?;
        std::fs::write(dir.join(CERT_FILE), cert)?;
        write_private(&dir.join(KEY_FILE), &key)?;
        Ok(dir.to_path_buf())
    }
}

fn read_in(dir: &Path, file: &str) -> Result<Vec<u8>> {
    let p = dir.join(file);
    std::fs::read(&p).with_context(|| format!("TLS: {}", p.display()))
}

fn write_private(path: &Path, pem: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| path.display().to_string())?;
    f.write_all(pem.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_come_from_the_common_name() {
        let cases = [
            ("brick/b0", Some(Role::Brick)),
            ("admin/cli", Some(Role::Admin)),
            ("client/node-1:/mnt", Some(Role::Client)),
            ("client", None),
            ("root/x", None),
            ("", None),
        ];
        for (cn, want) in cases {
            assert_eq!(Role::of_common_name(cn), want, "{cn}");
        }
    }

    #[test]
    fn an_issued_certificate_states_its_role() {
        let ca = Ca::generate("test").unwrap();
        for role in [Role::Brick, Role::Admin, Role::Client] {
            let (cert, _) = ca.issue(role, "x", &[]).unwrap();
            let der = x509_parser::pem::parse_x509_pem(cert.as_bytes())
                .unwrap()
                .1
                .contents;
            assert_eq!(peer_role(&[der]), Some(role));
        }
        assert!(ca.issue(Role::Client, "a/b", &[]).is_err());
        assert_eq!(peer_role(&[b"not a certificate".to_vec()]), None);
        assert_eq!(peer_role(&Vec::<Vec<u8>>::new()), None);
    }
}
