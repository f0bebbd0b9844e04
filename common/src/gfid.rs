//! Stable file ids: 128 bits chosen by the client at create time, identical on every brick.

use std::fmt;

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Gfid(pub [u8; 16]);

impl Gfid {
    /// The volume's root directory, the same on every brick.
    pub const ROOT: Gfid = Gfid([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);

    pub fn random() -> Gfid {
        loop {
            let g = Gfid(*uuid::Uuid::new_v4().as_bytes());
            // Inode numbers come from the first 8 bytes; 0 and 1 are not for files.
            if g.ino() > 1 {
                return g;
            }
        }
    }

    pub fn from_bytes(b: &[u8]) -> Option<Gfid> {
        Some(Gfid(b.try_into().ok()?))
    }

    /// The inode number the mount shows: stable across bricks, mounts and restarts.
    pub fn ino(&self) -> u64 {
        if *self == Gfid::ROOT {
            return 1;
        }
        u64::from_be_bytes(self.0[..8].try_into().unwrap())
    }

    pub fn to_vec(self) -> Vec<u8> {
        self.0.to_vec()
    }

    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn parse_hex(s: &str) -> Option<Gfid> {
        if s.len() != 32 || !s.is_ascii() {
            return None;
        }
        let mut out = [0u8; 16];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Gfid(out))
    }
}

/// A random 64-bit value (change ids).
pub fn rand_u64() -> u64 {
    u64::from_le_bytes(uuid::Uuid::new_v4().as_bytes()[..8].try_into().unwrap())
}

impl fmt::Debug for Gfid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

impl fmt::Display for Gfid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_ino() {
        let g = Gfid::random();
        assert_eq!(Gfid::parse_hex(&g.hex()), Some(g));
        assert!(g.ino() > 1);
        assert_eq!(Gfid::ROOT.ino(), 1);
        assert_eq!(Gfid::parse_hex("zz"), None);
    }
}

/// The brick's own directory at the root of every brick, never a user's name.
pub const META: &str = ".mortar";

/// Why `name` cannot be an entry of directory `parent`, as an errno: EINVAL (empty, `.`,
/// `..`, a `/` or a NUL in it), ENAMETOOLONG (over 255 bytes), EPERM (the brick's own
/// directory at the root). `None`: a valid name. One rule for bricks and clients.
pub fn name_errno(parent: Gfid, name: &[u8]) -> Option<i32> {
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0)
    {
        return Some(libc::EINVAL);
    }
    if name.len() > 255 {
        return Some(libc::ENAMETOOLONG);
    }
    if parent == Gfid::ROOT && name == META.as_bytes() {
        return Some(libc::EPERM);
    }
    None
}
