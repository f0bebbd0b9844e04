//! Replication over the bricks, in the seams of GlusterFS's AFR.
//!
//! A mutation of an inode runs under that inode's lock on a majority of bricks. Locks are
//! taken with a term that each brick promises (durably) never to go below, then kept while
//! this client goes on changing the inode (eager locking) and given up when idle or when a
//! brick tells us another client waits. Each change carries the version it expects and the
//! one it creates, so every brick applies changes to an inode in one order and a brick that
//! missed one refuses the next (it is stale) instead of diverging silently.
//!
//! A change counts when a majority applied it; bricks that did not are dropped from the
//! hold and left to heal, and the survivors are told to index the inode for healing.
//!
//! - [`volume`]: the volume and its members (volfile, connections, quorum);
//! - [`conn`]: one brick's connection, its session and liveness (ping);
//! - [`txn`]: the transaction: lock, mark, apply, clear; eager locks; fsync;
//! - [`fops`]: inode and directory writes, each one transaction;
//! - [`read`]: the choice of copy to read from, failover, lookups;
//! - [`lease`]: attributes, entries and small files cached under the bricks' leases;
//! - [`plock`]: applications' byte-range locks;
//! - [`heal`]: self-heal of entries, data and metadata;
//! - [`arbitrate`]: the decisions (freshness, outcome of a change, lookup vote, heal
//!   source and sinks, split brain) as pure functions.

pub mod arbitrate;
mod bulk;
pub mod conn;
pub mod fops;
pub mod heal;
pub mod lease;
pub mod plock;
pub mod read;
pub mod txn;
pub mod volume;
