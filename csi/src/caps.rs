//! Volume capability checks shared by the controller and node services.

use crate::csi::VolumeCapability;
use crate::csi::volume_capability::AccessType;
use crate::csi::volume_capability::access_mode::Mode;

/// File system types a CO may name for a Mortar volume. Empty means "driver's choice".
const FS_TYPES: &[&str] = &["", "mortar", "fuse.mortar"];

/// Why a capability cannot be served, or `Ok` if Mortar serves it. Every access mode is
/// supported: a Mortar volume is a shared file system, so one or many writers on one or
/// many nodes all work; single-writer modes are enforced by the CO, not the storage.
pub fn check(cap: &VolumeCapability) -> Result<(), String> {
    match &cap.access_type {
        None => return Err("volume capability has no access type (mount or block)".into()),
        Some(AccessType::Block(_)) => {
            return Err("block volumes are not supported; Mortar is a file system".into());
        }
        Some(AccessType::Mount(m)) if !FS_TYPES.contains(&m.fs_type.as_str()) => {
            return Err(format!(
                "fs_type {:?} is not supported (use \"mortar\" or leave it empty)",
                m.fs_type
            ));
        }
        Some(AccessType::Mount(_)) => {}
    }
    match cap.access_mode.as_ref().map(|m| Mode::try_from(m.mode)) {
        None => Err("volume capability has no access mode".into()),
        Some(Err(_)) => Err("unknown access mode".into()),
        Some(Ok(Mode::Unknown)) => Err("access mode UNKNOWN is not supported".into()),
        Some(Ok(_)) => Ok(()),
    }
}

/// True for access modes that only allow reading.
pub fn is_read_only(cap: &VolumeCapability) -> bool {
    matches!(
        cap.access_mode
            .as_ref()
            .and_then(|m| Mode::try_from(m.mode).ok()),
        Some(Mode::SingleNodeReaderOnly | Mode::MultiNodeReaderOnly)
    )
}
