//! TLS identities that arrive with CSI requests.
//!
//! A StorageClass names the Secrets the operator keeps for its cluster
//! (`csi.storage.k8s.io/node-stage-secret-name` → `<cluster>-client-tls`,
//! `provisioner-secret-name` / `controller-expand-secret-name` → `<cluster>-admin-tls`), and
//! the CO hands their data to the plugin in each request's `secrets`. The data has the layout
//! of a TLS directory: `ca.crt`, `tls.crt`, `tls.key`. One plugin serves many clusters, each
//! with its CA, so this identity goes with the volume, not with the process; without
//! secrets the process's own (`--tls-dir`) applies, as before.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use mortar_common::tls::{CA_FILE, CERT_FILE, KEY_FILE, TlsFiles};
use tonic::transport::ClientTlsConfig;

use crate::error::CsiError;

/// The three PEM texts of one identity. Never logged, never put in an error message.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsSecret {
    ca: String,
    cert: String,
    key: String,
}

impl std::fmt::Debug for TlsSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TlsSecret({})", &self.fingerprint()[..12])
    }
}

impl TlsSecret {
    /// The identity in a request's `secrets`: `None` when it carries none (no secrets, or
    /// secrets without any of the three keys: not a TLS identity, and a CO may pass such
    /// secrets for its own reasons, as csi-sanity does). Some of the keys but not all, or
    /// values that are not PEM, are a bad request: the StorageClass names the wrong Secret
    /// (the CA Secret, say).
    pub fn from_request(
        secrets: &HashMap<String, String>,
        what: &str,
    ) -> Result<Option<TlsSecret>, CsiError> {
        if ![CA_FILE, CERT_FILE, KEY_FILE]
            .iter()
            .any(|k| secrets.contains_key(*k))
        {
            if !secrets.is_empty() {
                let keys: Vec<&String> = secrets.keys().collect();
                tracing::debug!(?keys, "{what} hold no TLS identity; not used");
            }
            return Ok(None);
        }
        let missing: Vec<&str> = [CA_FILE, CERT_FILE, KEY_FILE]
            .into_iter()
            .filter(|k| secrets.get(*k).is_none_or(|v| v.trim().is_empty()))
            .collect();
        if !missing.is_empty() {
            return Err(CsiError::InvalidArgument(format!(
                "{what} lack {}: the StorageClass must name the cluster's TLS Secret \
                 (ca.crt, tls.crt, tls.key), e.g. <cluster>-client-tls",
                missing.join(", ")
            )));
        }
        // Only the key names go into messages: the spec warns secrets must not be logged.
        for k in [CA_FILE, CERT_FILE, KEY_FILE] {
            if !secrets[k].contains("-----BEGIN ") {
                return Err(CsiError::InvalidArgument(format!("{what}: {k} is not PEM")));
            }
        }
        Ok(Some(TlsSecret {
            ca: secrets[CA_FILE].clone(),
            cert: secrets[CERT_FILE].clone(),
            key: secrets[KEY_FILE].clone(),
        }))
    }

    /// A digest of the three texts: tells identities apart without keeping them around.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for part in [&self.ca, &self.cert, &self.key] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part.as_bytes());
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn client_config(&self) -> ClientTlsConfig {
        TlsFiles::from_pem(self.ca.clone(), self.cert.clone(), self.key.clone()).client()
    }

    /// Writes the identity as a TLS directory for `mortar-mount -o tls-dir=`: the directory
    /// (and its parent) 0700, the files 0600, each replaced by a rename so a mount starting
    /// meanwhile never reads half a key. Unchanged files are left alone.
    pub fn write_dir(&self, dir: &Path) -> std::io::Result<()> {
        if let Some(parent) = dir.parent() {
            if let Some(above) = parent.parent() {
                std::fs::create_dir_all(above)?;
            }
            private_dir(parent)?;
        }
        private_dir(dir)?;
        for (name, text) in [
            (CA_FILE, &self.ca),
            (CERT_FILE, &self.cert),
            (KEY_FILE, &self.key),
        ] {
            let path = dir.join(name);
            if std::fs::read(&path).is_ok_and(|old| old == text.as_bytes()) {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
                continue;
            }
            let tmp = dir.join(format!(".{name}.new"));
            let _ = std::fs::remove_file(&tmp);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
        }
        Ok(())
    }
}

/// A directory only its owner can enter, also when it existed with a looser mode.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secrets(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const PEM: &str = "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n";

    #[test]
    fn secrets_are_validated_by_key() {
        assert_eq!(TlsSecret::from_request(&secrets(&[]), "s").unwrap(), None);
        // Secrets of another kind are not ours to judge.
        assert_eq!(
            TlsSecret::from_request(&secrets(&[("password", "x")]), "s").unwrap(),
            None
        );
        // The CA Secret named by mistake: refused, naming what it lacks.
        let msg = TlsSecret::from_request(&secrets(&[(CA_FILE, PEM), ("ca.key", PEM)]), "s")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("lack tls.crt, tls.key"), "{msg}");
        let ok = secrets(&[(CA_FILE, PEM), (CERT_FILE, PEM), (KEY_FILE, PEM)]);
        assert!(TlsSecret::from_request(&ok, "s").unwrap().is_some());
        let err =
            TlsSecret::from_request(&secrets(&[(CA_FILE, PEM)]), "node stage secrets").unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, CsiError::InvalidArgument(_)));
        assert!(msg.contains("tls.crt, tls.key"), "{msg}");
        assert!(msg.contains("node stage secrets"), "{msg}");
        let mut not_pem = ok.clone();
        not_pem.insert(KEY_FILE.into(), "hunter2".into());
        let msg = TlsSecret::from_request(&not_pem, "s")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("tls.key is not PEM"), "{msg}");
        assert!(
            !msg.contains("hunter2"),
            "a secret's value never reaches a message"
        );
        let mut empty = ok;
        empty.insert(CA_FILE.into(), " ".into());
        assert!(TlsSecret::from_request(&empty, "s").is_err());
    }
}
