//! The volume description ("volfile"): which bricks hold the volume.

use serde::{Deserialize, Serialize};

pub const DEFAULT_PORT: u16 = 24100;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volfile {
    pub volume: String,
    pub generation: u64,
    pub bricks: Vec<BrickSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrickSpec {
    pub id: String,
    pub address: String,
}

#[derive(Debug, thiserror::Error)]
pub enum VolfileError {
    #[error("volfile is not valid YAML: {0}")]
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

    #[test]
    fn default_port() {
        assert_eq!(with_default_port("10.0.0.1"), "10.0.0.1:24100");
        assert_eq!(with_default_port("h:1"), "h:1");
    }
}
