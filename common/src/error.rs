//! The client library's errors; mapped to errno once, at the FUSE edge.

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The operation itself was refused (the same answer from the bricks that count).
    #[error("{}", std::io::Error::from_raw_os_error(*.0))]
    Os(i32),
    /// Fewer than a majority of bricks could take part: refuse rather than risk split brain.
    #[error("no quorum: {have} of {need} bricks needed could take part")]
    NoQuorum { have: usize, need: usize },
    /// No copy that is known to be up to date is reachable.
    #[error("no up-to-date copy reachable")]
    NoGoodCopy,
    /// The copies disagree in a way the records cannot settle.
    #[error("copies disagree (split brain)")]
    SplitBrain,
    /// Another client or healer holds the lock (and was asked to let go).
    #[error("inode busy")]
    Busy,
    #[error("brick {brick}: {msg}")]
    Transport { brick: String, msg: String },
    /// The brick refused the request for who we are (a mount's certificate asking for an
    /// administrative step).
    #[error("brick {brick}: {msg}")]
    Denied { brick: String, msg: String },
    #[error("volfile: {0}")]
    Volfile(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn errno(&self) -> i32 {
        match self {
            Error::Os(e) => *e,
            Error::NoQuorum { .. } => libc::EROFS,
            Error::NoGoodCopy | Error::SplitBrain => libc::EIO,
            Error::Busy => libc::EAGAIN,
            Error::Transport { .. } => libc::ENOTCONN,
            Error::Denied { .. } => libc::EACCES,
            Error::Volfile(_) => libc::EINVAL,
        }
    }

    pub fn from_errno(e: i32) -> Result<()> {
        if e == 0 { Ok(()) } else { Err(Error::Os(e)) }
    }
}
