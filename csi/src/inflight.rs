//! Per-volume operation guard.
//!
//! The CSI spec asks a plugin to answer ABORTED when a call arrives for a volume that
//! already has an operation in flight (the CO retries with backoff), instead of running
//! two creates or a stage and an unstage of one volume at once.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use crate::error::CsiError;

#[derive(Clone, Default)]
pub struct InFlight {
    keys: Arc<Mutex<HashSet<String>>>,
}

/// Held while the operation runs; releases the key when dropped, also on error or
/// when the client cancels the call and tonic drops the future.
pub struct Guard {
    keys: Arc<Mutex<HashSet<String>>>,
    key: String,
}

impl InFlight {
    pub fn try_lock(&self, key: impl Into<String>) -> Result<Guard, CsiError> {
        let key = key.into();
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if !keys.insert(key.clone()) {
            return Err(CsiError::Aborted(key));
        }
        Ok(Guard {
            keys: self.keys.clone(),
            key,
        })
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_aborted_until_release() {
        let f = InFlight::default();
        let g = f.try_lock("v1").unwrap();
        assert!(matches!(f.try_lock("v1"), Err(CsiError::Aborted(_))));
        let _other = f.try_lock("v2").unwrap();
        drop(g);
        f.try_lock("v1").unwrap();
    }
}
