//! What every part of Mortar shares: inode ids (gfid), the volume description (volfile),
//! the replication errors with their errno, and logging.

pub mod bulk;
pub mod error;
pub mod gfid;
pub mod telemetry;
pub mod tls;
pub mod volfile;
