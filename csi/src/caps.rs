//! Volume capability checks shared by the controller and node services.

use crate::csi::VolumeCapability;
use crate::csi::volume_capability::AccessType;
use crate::csi::volume_capability::access_mode::Mode;

/// File system types a CO may name for a Mortar volume. Empty means "driver's choice".
const FS_TYPES: &[&str] = &["", "mortar", "fuse.mortar"];

/// Why a capability cannot be served. The spec gives the two cases different codes on the
/// node (NodeStage/NodePublish: "Exceeds capabilities" is FAILED_PRECONDITION), while a
/// malformed capability is always a bad request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CapError {
    /// A required part (access type, access mode) is missing or unknown.
    Malformed(String),
    /// Well formed, but not something a Mortar volume offers (block access, another fs type).
    Unsupported(String),
}

impl std::fmt::Display for CapError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CapError::Malformed(why) | CapError::Unsupported(why) => f.write_str(why),
        }
    }
}

/// Why a capability cannot be served, or `Ok` if Mortar serves it. Every access mode is
/// supported: a Mortar volume is a shared file system, so one or many writers on one or
/// many nodes all work; single-writer modes are enforced by the CO, not the storage
/// (except SINGLE_NODE_SINGLE_WRITER at NodePublishVolume, see `node.rs`).
pub fn check(cap: &VolumeCapability) -> Result<(), CapError> {
    match &cap.access_type {
        None => {
            return Err(CapError::Malformed(
                "volume capability has no access type (mount or block)".into(),
            ));
        }
        Some(AccessType::Block(_)) => {
            return Err(CapError::Unsupported(
                "block volumes are not supported; Mortar is a file system".into(),
            ));
        }
        Some(AccessType::Mount(m)) if !FS_TYPES.contains(&m.fs_type.as_str()) => {
            return Err(CapError::Unsupported(format!(
                "fs_type {:?} is not supported (use \"mortar\" or leave it empty)",
                m.fs_type
            )));
        }
        Some(AccessType::Mount(_)) => {}
    }
    match cap.access_mode.as_ref().map(|m| Mode::try_from(m.mode)) {
        None => Err(CapError::Malformed(
            "volume capability has no access mode".into(),
        )),
        Some(Err(_)) => Err(CapError::Malformed("unknown access mode".into())),
        Some(Ok(Mode::Unknown)) => Err(CapError::Malformed(
            "access mode UNKNOWN is not supported".into(),
        )),
        Some(Ok(_)) => Ok(()),
    }
}

/// The access mode of a capability, if it names a known one.
pub fn mode(cap: &VolumeCapability) -> Option<Mode> {
    cap.access_mode
        .as_ref()
        .and_then(|m| Mode::try_from(m.mode).ok())
}

/// True for access modes that only allow reading.
pub fn is_read_only(cap: &VolumeCapability) -> bool {
    matches!(
        mode(cap),
        Some(Mode::SingleNodeReaderOnly | Mode::MultiNodeReaderOnly)
    )
}
