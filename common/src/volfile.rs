//! The volume description ("volfile"): which bricks hold the volume.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

pub const DEFAULT_PORT: u16 = 24100;

/// The largest `ping-timeout` a volfile may ask for, in seconds (as `-o ping-timeout`).
pub const MAX_PING_TIMEOUT_SECS: u64 = 3600;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volfile {
    pub volume: String,
    pub generation: u64,
    pub bricks: Vec<BrickSpec>,
    /// Seconds a client waits for a silent brick before dropping it; clients use it unless
    /// mounted with `-o ping-timeout`. Optional (an extension of the DESIGN.md contract).
    #[serde(
        rename = "ping-timeout",
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "ping_timeout_secs"
    )]
    pub ping_timeout: Option<u64>,
}

/// `ping-timeout`: a whole number of seconds, 1 to `MAX_PING_TIMEOUT_SECS`.
fn ping_timeout_secs<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let v = Option::<serde_norway::Value>::deserialize(d)?;
    let Some(v) = v else { return Ok(None) };
    match v.as_u64() {
        Some(n) if (1..=MAX_PING_TIMEOUT_SECS).contains(&n) => Ok(Some(n)),
        _ => Err(serde::de::Error::custom(format!(
            "ping-timeout must be a whole number of seconds from 1 to {MAX_PING_TIMEOUT_SECS}, not {}",
            serde_norway::to_string(&v)
                .map(|s| s.trim_end().to_string())
                .unwrap_or_else(|_| format!("{v:?}"))
        ))),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrickSpec {
    pub id: String,
    pub address: String,
}

#[derive(Debug, thiserror::Error)]
pub enum VolfileError {
    #[error("volfile: {0}")]
    Yaml(#[from] serde_norway::Error),
    #[error("volfile: {0}")]
    Invalid(String),
}

impl Volfile {
    pub fn parse(text: &str) -> Result<Volfile, VolfileError> {
        let v: Volfile = serde_norway::from_str(text)?;
        v.validate()?;
        Ok(v)
    }

    /// The volfile's `ping-timeout`, if it sets one.
    pub fn ping_timeout(&self) -> Option<Duration> {
        self.ping_timeout.map(Duration::from_secs)
    }

    pub fn to_yaml(&self) -> String {
        serde_norway::to_string(self).expect("volfile serialises")
    }

    fn validate(&self) -> Result<(), VolfileError> {
        let bad = |m: String| Err(VolfileError::Invalid(m));
        if self.volume.is_empty()
            || !self
                .volume
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return bad(format!(
                "volume name {:?} must be letters, digits, '-' or '_'",
                self.volume
            ));
        }
        if self.bricks.is_empty() {
            return bad("no bricks".into());
        }
        let mut ids = std::collections::HashSet::new();
        for b in &self.bricks {
            if b.id.is_empty() || b.id.len() > 63 {
                return bad(format!("brick id {:?} must be 1 to 63 characters", b.id));
            }
            if !ids.insert(&b.id) {
                return bad(format!("brick id {:?} appears twice", b.id));
            }
            if b.address
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse::<u16>().ok())
                .is_none()
            {
                return bad(format!(
                    "brick {} address {:?} must be HOST:PORT",
                    b.id, b.address
                ));
            }
        }
        Ok(())
    }

    /// Writes needed for a change to count: a strict majority of the bricks.
    pub fn quorum(&self) -> usize {
        self.bricks.len() / 2 + 1
    }

    pub fn brick_index(&self, id: &str) -> Option<usize> {
        self.bricks.iter().position(|b| b.id == id)
    }
}

/// `host`, `host:port` → `host:port` with the default brick port.
pub fn with_default_port(host: &str) -> String {
    if host.starts_with('[')
        || host
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        host.to_string()
    } else {
        format!("{host}:{DEFAULT_PORT}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_design_example() {
        let v = Volfile::parse(
            "volume: data\ngeneration: 1\nbricks:\n  - id: b0\n    address: 127.0.0.11:24100\n  - id: b1\n    address: 127.0.0.12:24100\n  - id: b2\n    address: 127.0.0.13:24100\n",
        )
        .unwrap();
        assert_eq!(v.bricks.len(), 3);
        assert_eq!(v.quorum(), 2);
        assert_eq!(Volfile::parse(&v.to_yaml()).unwrap(), v);
    }

    #[test]
    fn rejects_bad_volfiles() {
        assert!(Volfile::parse("volume: data\ngeneration: 1\nbricks: []\n").is_err());
        assert!(
            Volfile::parse("volume: data\ngeneration: 1\nbricks:\n  - {id: b0, address: x}\n")
                .is_err()
        );
        assert!(
            Volfile::parse("volume: data\ngeneration: 1\nbricks:\n  - {id: b0, address: 'a:1'}\n  - {id: b0, address: 'b:1'}\n")
                .is_err()
        );
        assert!(
            Volfile::parse("volume: 'a/b'\ngeneration: 1\nbricks:\n  - {id: b0, address: 'a:1'}\n")
                .is_err()
        );
    }

    const BRICKS: &str = "bricks:\n  - id: b0\n    address: 127.0.0.11:24100\n";

    #[test]
    fn ping_timeout_is_optional() {
        let v = Volfile::parse(&format!("volume: data\ngeneration: 1\n{BRICKS}")).unwrap();
        assert_eq!(v.ping_timeout, None);
        assert_eq!(v.ping_timeout(), None);
        assert!(
            !v.to_yaml().contains("ping-timeout"),
            "not written when unset: {}",
            v.to_yaml()
        );

        let v = Volfile::parse(&format!(
            "volume: data\ngeneration: 2\nping-timeout: 2\n{BRICKS}"
        ))
        .unwrap();
        assert_eq!(v.ping_timeout, Some(2));
        assert_eq!(v.ping_timeout(), Some(Duration::from_secs(2)));
        let yaml = v.to_yaml();
        assert!(yaml.contains("ping-timeout: 2\n"), "{yaml}");
        assert_eq!(Volfile::parse(&yaml).unwrap(), v);
        // An explicit null is the same as leaving the key out.
        let v = Volfile::parse(&format!(
            "volume: data\ngeneration: 1\nping-timeout: null\n{BRICKS}"
        ))
        .unwrap();
        assert_eq!(v.ping_timeout, None);
    }

    #[test]
    fn rejects_bad_ping_timeouts() {
        for bad in ["0", "-1", "1.5", "'5'", "5s", "[1]", "3601", "true"] {
            let e = Volfile::parse(&format!(
                "volume: data\ngeneration: 1\nping-timeout: {bad}\n{BRICKS}"
            ))
            .expect_err(bad)
            .to_string();
            assert!(
                e.contains("ping-timeout must be a whole number of seconds from 1 to 3600"),
                "{bad}: {e}"
            );
        }
        assert!(
            Volfile::parse(&format!(
                "volume: data\ngeneration: 1\nping-timeout: 3600\n{BRICKS}"
            ))
            .is_ok()
        );
    }

    #[test]
    fn default_port() {
        assert_eq!(with_default_port("10.0.0.1"), "10.0.0.1:24100");
        assert_eq!(with_default_port("h:1"), "h:1");
    }
}
