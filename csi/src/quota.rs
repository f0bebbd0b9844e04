//! The one place the controller touches directory quotas on a Mortar volume.
//!
//! The core's replicated directory quotas: `Volume::set_quota(dir, limit)` (0 removes the
//! limit) and `Volume::quota(dir) -> Option<(limit, used)>`. Writes past the limit fail
//! with EDQUOT, and statfs through a mount on a path inside the directory shows the
//! limit and usage, so a PVC's `df` is its own.
//!
//! The limit is also written to the directory's `user.mortar.csi.limit` xattr: the node
//! service falls back to it for NodeGetVolumeStats when a mount's statfs reports the
//! whole volume.

use mortar_common::error::Result;
use mortar_common::gfid::Gfid;
use mortar_replication::volume::Volume;

use crate::ops::LIMIT_XATTR;

/// Sets (or with 0 removes) the size limit of directory `dir`. The quota goes last:
/// its presence marks the controller's record complete.
pub async fn set_limit(vol: &Volume, dir: Gfid, limit_bytes: u64) -> Result<()> {
    if limit_bytes > 0 {
        vol.setxattr(
            dir,
            LIMIT_XATTR.as_bytes(),
            limit_bytes.to_string().as_bytes(),
            0,
        )
        .await?;
    }
    vol.set_quota(dir, limit_bytes).await
}

/// The size limit of directory `dir`, `None` without one.
pub async fn limit(vol: &Volume, dir: Gfid) -> Result<Option<u64>> {
    Ok(vol
        .quota(dir)
        .await?
        .map(|(limit, _used)| limit)
        .filter(|l| *l > 0))
}

/// Limit and usage of directory `dir`, as the core counts them.
pub async fn usage(vol: &Volume, dir: Gfid) -> Result<Option<(u64, u64)>> {
    vol.quota(dir).await
}
