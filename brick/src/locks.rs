//! Locks owned by client sessions: inode locks for replication transactions, and the POSIX
//! and BSD locks applications take through a mount.

use std::collections::HashMap;
use std::sync::Mutex;

use mortar_common::gfid::Gfid;
use tokio::sync::Notify;

pub type SessionId = [u8; 16];

/// Exclusive per-inode locks. A client keeps them across many operations (eager locking)
/// and gives them up when told another session waits.
/// Most inode locks one session may hold at once (`MORTAR_TEST_SESSION_CAP` lowers it in
/// tests): a client that keeps taking locks and never gives them back is refused, rather
/// than growing the table without bound. A mount gives idle locks back within a second.
pub const SESSION_LOCKS: usize = 65_536;

/// The per-session cap in force (see `SESSION_LOCKS`, `crate::service`'s open cap).
pub fn session_cap(default: usize) -> usize {
    static CAP: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    CAP.get_or_init(|| std::env::var("MORTAR_TEST_SESSION_CAP").ok()?.parse().ok())
        .unwrap_or(default)
}

#[derive(Default)]
struct Table {
    by_inode: HashMap<Gfid, SessionId>,
    per_session: HashMap<SessionId, usize>,
}

impl Table {
    fn take(&mut self, g: Gfid, s: SessionId) {
        if self.by_inode.insert(g, s) != Some(s) {
            *self.per_session.entry(s).or_default() += 1;
        }
    }

    fn free(&mut self, g: Gfid) {
        if let Some(s) = self.by_inode.remove(&g) {
            match self.per_session.get_mut(&s) {
                Some(n) if *n > 1 => *n -= 1,
                _ => {
                    self.per_session.remove(&s);
                }
            }
        }
    }
}

/// Why a lock was not granted.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// Another session holds this inode.
    Busy(SessionId, Gfid),
    /// The session holds `SESSION_LOCKS` already.
    TooMany,
}

/// Exclusive per-inode locks. A client keeps them across many operations (eager locking)
/// and gives them up when told another session waits.
#[derive(Default)]
pub struct InodeLocks {
    held: Mutex<Table>,
    pub released: Notify,
}

impl InodeLocks {
    /// Takes all of `gfids` for `s`, or none; on conflict names the holder and the inode.
    pub fn try_lock_all(&self, s: SessionId, gfids: &[Gfid]) -> Result<(), Refused> {
        let mut t = self.held.lock().unwrap();
        let mut new = 0;
        for g in gfids {
            match t.by_inode.get(g) {
                Some(h) if *h != s => return Err(Refused::Busy(*h, *g)),
                Some(_) => {}
                None => new += 1,
            }
        }
        let have = t.per_session.get(&s).copied().unwrap_or(0);
        if have + new > session_cap(SESSION_LOCKS) {
            return Err(Refused::TooMany);
        }
        for g in gfids {
            t.take(*g, s);
        }
        Ok(())
    }

    /// Whether a session other than `s` holds `g`'s lock.
    pub fn held_by_other(&self, s: SessionId, g: Gfid) -> bool {
        self.held
            .lock()
            .unwrap()
            .by_inode
            .get(&g)
            .is_some_and(|h| *h != s)
    }

    pub fn holds(&self, s: SessionId, g: Gfid) -> bool {
        self.held.lock().unwrap().by_inode.get(&g) == Some(&s)
    }

    /// The creator of a new inode holds its lock (counted, not capped: the create itself
    /// was allowed).
    pub fn grant_new(&self, s: SessionId, g: Gfid) {
        self.held.lock().unwrap().take(g, s);
    }

    pub fn unlock(&self, s: SessionId, gfids: &[Gfid]) {
        let mut t = self.held.lock().unwrap();
        for g in gfids {
            if t.by_inode.get(g) == Some(&s) {
                t.free(*g);
            }
        }
        drop(t);
        self.released.notify_waiters();
    }

    /// Frees everything a dead session held; returns what it held.
    pub fn release_session(&self, s: SessionId) -> Vec<Gfid> {
        let mut t = self.held.lock().unwrap();
        let mine: Vec<Gfid> = t
            .by_inode
            .iter()
            .filter(|(_, h)| **h == s)
            .map(|(g, _)| *g)
            .collect();
        for g in &mine {
            t.free(*g);
        }
        drop(t);
        self.released.notify_waiters();
        mine
    }
}

pub const F_RDLCK: i32 = libc::F_RDLCK;
pub const F_WRLCK: i32 = libc::F_WRLCK;
pub const F_UNLCK: i32 = libc::F_UNLCK;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangeLock {
    pub session: SessionId,
    pub owner: u64,
    pub pid: u32,
    pub typ: i32,
    pub start: u64,
    pub end: u64, // inclusive
}

impl RangeLock {
    fn same_owner(&self, o: &RangeLock) -> bool {
        self.session == o.session && self.owner == o.owner
    }
    fn overlaps(&self, o: &RangeLock) -> bool {
        self.start <= o.end && o.start <= self.end
    }
}

/// Byte-range locks per inode, POSIX semantics (a new lock of an owner replaces the part of
/// its own locks it overlaps).
#[derive(Default)]
pub struct RangeLocks {
    by_inode: Mutex<HashMap<Gfid, Vec<RangeLock>>>,
    pub changed: Notify,
}

impl RangeLocks {
    pub fn conflict(&self, g: Gfid, want: &RangeLock) -> Option<RangeLock> {
        let map = self.by_inode.lock().unwrap();
        map.get(&g)?
            .iter()
            .find(|l| {
                !l.same_owner(want) && l.overlaps(want) && (l.typ == F_WRLCK || want.typ == F_WRLCK)
            })
            .copied()
    }

    /// Sets (or with F_UNLCK clears) `want` if nothing conflicts; else returns the conflict.
    pub fn set(&self, g: Gfid, want: RangeLock) -> Result<(), RangeLock> {
        let mut map = self.by_inode.lock().unwrap();
        let list = map.entry(g).or_default();
        if want.typ != F_UNLCK
            && let Some(c) = list.iter().find(|l| {
                !l.same_owner(&want)
                    && l.overlaps(&want)
                    && (l.typ == F_WRLCK || want.typ == F_WRLCK)
            })
        {
            return Err(*c);
        }
        let mut out = Vec::with_capacity(list.len() + 2);
        for l in list.drain(..) {
            if !l.same_owner(&want) || !l.overlaps(&want) {
                out.push(l);
                continue;
            }
            if l.start < want.start {
                out.push(RangeLock {
                    end: want.start - 1,
                    ..l
                });
            }
            if l.end > want.end {
                out.push(RangeLock {
                    start: want.end + 1,
                    ..l
                });
            }
        }
        if want.typ != F_UNLCK {
            out.push(want);
        }
        if out.is_empty() {
            map.remove(&g);
        } else {
            *map.get_mut(&g).unwrap() = out;
        }
        drop(map);
        self.changed.notify_waiters();
        Ok(())
    }

    /// Gives session `to` the locks of session `from` (a successor of the same mount).
    pub fn transfer(&self, from: SessionId, to: SessionId) -> usize {
        let mut n = 0;
        for list in self.by_inode.lock().unwrap().values_mut() {
            for l in list.iter_mut().filter(|l| l.session == from) {
                l.session = to;
                n += 1;
            }
        }
        n
    }

    pub fn release_session(&self, s: SessionId) {
        let mut map = self.by_inode.lock().unwrap();
        map.retain(|_, list| {
            list.retain(|l| l.session != s);
            !list.is_empty()
        });
        drop(map);
        self.changed.notify_waiters();
    }
}

/// The 16 bytes every session of one mount names (`Hello.family`).
pub type Family = [u8; 16];

/// The POSIX locks of sessions that ended without closing, kept for the next session of
/// their mount (their family) from the same peer: at most one waiting session a family.
#[derive(Default)]
pub struct Retained {
    by_family: Mutex<HashMap<Family, (SessionId, String)>>,
}

impl Retained {
    /// Keeps the locks of session `s` of family `f` (peer certificate `cert`) for its
    /// successor. Returns an earlier session of the family whose locks nobody took: they
    /// go now (else nothing would ever release them).
    pub fn keep(&self, f: Family, s: SessionId, cert: &str) -> Option<SessionId> {
        let prev = self
            .by_family
            .lock()
            .unwrap()
            .insert(f, (s, cert.to_string()));
        prev.map(|(p, _)| p).filter(|p| *p != s)
    }

    /// The session whose locks a new session of family `f` from peer `cert` takes over;
    /// another peer's stay where they are.
    pub fn adopt(&self, f: Family, cert: &str) -> Option<SessionId> {
        let mut m = self.by_family.lock().unwrap();
        match m.get(&f) {
            Some((s, c)) if c == cert => {
                let s = *s;
                m.remove(&f);
                Some(s)
            }
            _ => None,
        }
    }

    /// Whether session `s` of family `f` still waits for a successor; it stops waiting.
    pub fn expire(&self, f: Family, s: SessionId) -> bool {
        let mut m = self.by_family.lock().unwrap();
        if m.get(&f).is_some_and(|(w, _)| *w == s) {
            m.remove(&f);
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lk(s: u8, owner: u64, typ: i32, start: u64, end: u64) -> RangeLock {
        RangeLock {
            session: [s; 16],
            owner,
            pid: 1,
            typ,
            start,
            end,
        }
    }

    #[test]
    fn inode_locks_are_exclusive_and_freed_with_the_session() {
        let l = InodeLocks::default();
        let (a, b) = ([1u8; 16], [2u8; 16]);
        let (g1, g2) = (Gfid::random(), Gfid::random());
        assert!(l.try_lock_all(a, &[g1]).is_ok());
        assert!(
            l.try_lock_all(a, &[g1]).is_ok(),
            "re-entrant for the holder"
        );
        assert_eq!(l.try_lock_all(b, &[g2, g1]), Err(Refused::Busy(a, g1)));
        assert!(!l.holds(b, g2), "all or none");
        assert_eq!(l.release_session(a), vec![g1]);
        assert!(l.try_lock_all(b, &[g2, g1]).is_ok());
    }

    #[test]
    fn range_locks_conflict_split_and_release() {
        let l = RangeLocks::default();
        let g = Gfid::random();
        assert!(l.set(g, lk(1, 1, F_WRLCK, 0, 99)).is_ok());
        assert!(l.set(g, lk(2, 1, F_RDLCK, 50, 60)).is_err());
        assert!(l.set(g, lk(2, 1, F_RDLCK, 100, 200)).is_ok());
        // Unlocking the middle of owner 1's lock leaves two pieces.
        assert!(l.set(g, lk(1, 1, F_UNLCK, 40, 59)).is_ok());
        assert!(l.conflict(g, &lk(3, 1, F_WRLCK, 45, 50)).is_none());
        assert!(l.conflict(g, &lk(3, 1, F_WRLCK, 30, 45)).is_some());
        assert!(
            l.conflict(g, &lk(3, 1, F_RDLCK, 150, 150)).is_none(),
            "readers share"
        );
        l.release_session([1; 16]);
        assert!(l.conflict(g, &lk(3, 1, F_WRLCK, 0, 99)).is_none());
    }

    #[test]
    fn a_successor_takes_over_its_predecessors_range_locks() {
        let l = RangeLocks::default();
        let g = Gfid::random();
        assert!(l.set(g, lk(1, 7, F_WRLCK, 0, 9)).is_ok());
        assert!(l.set(g, lk(2, 7, F_WRLCK, 20, 29)).is_ok());
        assert_eq!(l.transfer([1; 16], [3; 16]), 1);
        // The same owner of the new session holds it: no conflict with itself, and it
        // can unlock it; others still conflict.
        assert!(l.conflict(g, &lk(3, 7, F_WRLCK, 0, 9)).is_none());
        assert!(l.conflict(g, &lk(2, 7, F_WRLCK, 0, 9)).is_some());
        l.release_session([1; 16]);
        assert!(
            l.conflict(g, &lk(2, 7, F_WRLCK, 0, 9)).is_some(),
            "moved, not freed"
        );
        assert!(l.set(g, lk(3, 7, F_UNLCK, 0, 9)).is_ok());
        assert!(l.conflict(g, &lk(2, 7, F_WRLCK, 0, 9)).is_none());
    }

    #[test]
    fn retained_locks_go_to_one_successor_of_the_same_peer_and_are_never_orphaned() {
        let r = Retained::default();
        let f = [7; 16];
        assert_eq!(r.keep(f, [1; 16], "mount-a"), None);
        // Another peer naming the family takes nothing.
        assert_eq!(r.adopt(f, "someone-else"), None);
        // A second session of the family ending before any successor came: the first
        // one's locks are handed back to be released, not lost.
        assert_eq!(r.keep(f, [2; 16], "mount-a"), Some([1; 16]));
        assert!(!r.expire(f, [1; 16]), "the first no longer waits");
        assert_eq!(r.adopt(f, "mount-a"), Some([2; 16]));
        assert_eq!(r.adopt(f, "mount-a"), None, "taken once");
        assert!(
            !r.expire(f, [2; 16]),
            "taken over: its expiry releases nothing"
        );
        r.keep(f, [3; 16], "mount-a");
        assert!(r.expire(f, [3; 16]));
        assert_eq!(r.adopt(f, "mount-a"), None);
    }

    #[test]
    fn a_session_holds_at_most_its_cap_of_inode_locks() {
        let l = InodeLocks::default();
        let (a, b) = ([1u8; 16], [2u8; 16]);
        let some = |n: usize| (0..n).map(|_| Gfid::random()).collect::<Vec<_>>();
        let first = some(SESSION_LOCKS);
        assert!(l.try_lock_all(a, &first).is_ok());
        // Taking what it holds again costs nothing; one more is refused.
        assert!(l.try_lock_all(a, &first[..16]).is_ok());
        assert_eq!(l.try_lock_all(a, &some(1)), Err(Refused::TooMany));
        // Other sessions are not affected; giving locks back makes room.
        assert!(l.try_lock_all(b, &some(16)).is_ok());
        l.unlock(a, &first[..16]);
        assert!(l.try_lock_all(a, &some(16)).is_ok());
        assert_eq!(l.try_lock_all(a, &some(1)), Err(Refused::TooMany));
        l.release_session(a);
        assert!(l.try_lock_all(a, &some(SESSION_LOCKS)).is_ok());
    }
}
