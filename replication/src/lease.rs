//! What this client caches under leases: inodes' attributes, directories' entries and small
//! files' data, served without asking the bricks while a majority of them lease the inode to
//! this client (see `mortar_brick::leases` for the bricks' side and why a majority is enough).
//!
//! A lease from a brick counts while that brick's session is the one that granted it (same
//! connection epoch) and until the lease window after the last ping the brick answered was
//! sent (`conn::Brick::lease_trusted`): a brick keeps a silent client's leases at least that
//! long, so this client stops trusting one before the brick may let another change it.
//!
//! A recall drops everything cached of the inode. A reply that was on its way while a recall
//! of its inode came is not cached: each read takes a ticket before it asks, and what it
//! brings is kept only if no recall of the inode came after the ticket.

use std::collections::HashMap;
use std::sync::Mutex;

use mortar_common::gfid::Gfid;
use mortar_proto as pb;

/// A brick that granted a lease, and the connection (epoch) it granted it on.
pub type Grant = (String, u64);

/// Files up to this size are cached whole.
pub const SMALL_FILE: u64 = 256 << 10;
/// Bytes of file data cached at most; past it, the data cache starts again empty.
const DATA_BYTES: usize = 64 << 20;
/// Inodes with cached attributes at most (and as many directories); past it, those caches
/// start again empty (a client that walks a huge tree must not grow without bound).
const INODES: usize = 200_000;

#[derive(Default)]
struct Opens {
    /// Opens made through a lease, not counted on the bricks when they were made.
    local: u32,
    /// Of those, how many a recall made count on each brick (and connection).
    registered: HashMap<Grant, u32>,
}

#[derive(Default)]
struct Dir {
    names: HashMap<Vec<u8>, Gfid>,
    /// Every entry is there (a name missing is not in the directory).
    complete: bool,
}

#[derive(Default)]
struct Inner {
    /// Bumped by every recall; a read's ticket is its value when the read began.
    seq: u64,
    /// Tickets below it are refused (the memory of older recalls was let go).
    floor: u64,
    recalled_at: HashMap<Gfid, u64>,
    leases: HashMap<Gfid, Vec<Grant>>,
    /// Attributes, and the bricks holding the newest copy (where reads go).
    attrs: HashMap<Gfid, (pb::Attr, Vec<String>)>,
    /// Directories' entries: name → gfid.
    dirs: HashMap<Gfid, Dir>,
    data: HashMap<Gfid, pb::Bytes>,
    data_bytes: usize,
    opens: HashMap<Gfid, Opens>,
}

impl Inner {
    fn fresh(&self, ticket: u64, g: Gfid) -> bool {
        ticket >= self.floor && self.recalled_at.get(&g).is_none_or(|s| *s <= ticket)
    }

    /// Refuses what reads of `g` begun before now bring (see `fresh`).
    fn refuse_older(&mut self, g: Gfid) {
        self.seq += 1;
        if self.recalled_at.len() >= INODES {
            self.recalled_at.clear();
            self.floor = self.seq;
        }
        self.recalled_at.insert(g, self.seq);
    }

    fn drop_inode(&mut self, g: Gfid) {
        self.refuse_older(g);
        self.leases.remove(&g);
        self.attrs.remove(&g);
        self.dirs.remove(&g);
        if let Some(d) = self.data.remove(&g) {
            self.data_bytes -= d.len();
        }
    }
}

#[derive(Default)]
pub struct Cache {
    inner: Mutex<Inner>,
}

/// What the caller knows of the bricks' leases now: `ok(grants)` says whether enough of
/// them still count (a majority of the volume).
pub trait Trust: Fn(&[Grant]) -> bool {}
impl<F: Fn(&[Grant]) -> bool> Trust for F {}

impl Cache {
    /// A ticket for a read about to ask the bricks.
    pub fn ticket(&self) -> u64 {
        self.inner.lock().unwrap().seq
    }

    /// Keeps `g`'s attributes (and where its newest copies are), leased by `from`, unless
    /// a recall of `g` came after `ticket`.
    pub fn put_attr(
        &self,
        ticket: u64,
        g: Gfid,
        attr: pb::Attr,
        readable: Vec<String>,
        from: Vec<Grant>,
    ) {
        let mut i = self.inner.lock().unwrap();
        if !i.fresh(ticket, g) {
            return;
        }
        if i.attrs.len() >= INODES {
            i.attrs.clear();
            let Inner { leases, opens, .. } = &mut *i;
            leases.retain(|g, _| opens.contains_key(g));
        }
        i.leases.insert(g, from);
        i.attrs.insert(g, (attr, readable));
    }

    /// Records a lease on `g` alone (a directory whose attributes are not kept).
    pub fn put_lease(&self, ticket: u64, g: Gfid, from: Vec<Grant>) {
        let mut i = self.inner.lock().unwrap();
        if i.fresh(ticket, g) {
            i.leases.insert(g, from);
        }
    }

    fn leased(i: &Inner, g: Gfid, ok: &impl Trust) -> bool {
        i.leases.get(&g).is_some_and(|from| ok(from))
    }

    pub fn attr(&self, g: Gfid, ok: impl Trust) -> Option<(pb::Attr, Vec<String>)> {
        let i = self.inner.lock().unwrap();
        if !Self::leased(&i, g, &ok) {
            return None;
        }
        i.attrs.get(&g).cloned()
    }

    /// Whether `g` is leased now (a directory whose listing a read is about to keep).
    pub fn is_leased(&self, g: Gfid, ok: impl Trust) -> bool {
        Self::leased(&self.inner.lock().unwrap(), g, &ok)
    }

    /// What the cache says of `name` in directory `parent`: `Some(Some(g))` there as `g`,
    /// `Some(None)` not there, `None` not known.
    pub fn entry(&self, parent: Gfid, name: &[u8], ok: impl Trust) -> Option<Option<Gfid>> {
        let i = self.inner.lock().unwrap();
        if !Self::leased(&i, parent, &ok) {
            return None;
        }
        let d = i.dirs.get(&parent)?;
        match d.names.get(name) {
            Some(g) => Some(Some(*g)),
            None if d.complete => Some(None),
            None => None,
        }
    }

    /// Keeps the whole listing of `dir` (its lease was taken before the listing was read).
    pub fn put_dir(
        &self,
        ticket: u64,
        dir: Gfid,
        entries: impl IntoIterator<Item = (Vec<u8>, Gfid)>,
    ) {
        let mut i = self.inner.lock().unwrap();
        if !i.fresh(ticket, dir) || !i.leases.contains_key(&dir) {
            return;
        }
        if i.dirs.len() >= INODES {
            i.dirs.clear();
        }
        let names = entries.into_iter().collect();
        i.dirs.insert(
            dir,
            Dir {
                names,
                complete: true,
            },
        );
    }

    /// Keeps one entry of `dir`, found by a lookup under `dir`'s lease.
    pub fn put_entry(&self, ticket: u64, dir: Gfid, name: &[u8], g: Gfid) {
        let mut i = self.inner.lock().unwrap();
        if !i.fresh(ticket, dir) || !i.leases.contains_key(&dir) {
            return;
        }
        if i.dirs.len() >= INODES {
            i.dirs.clear();
        }
        i.dirs
            .entry(dir)
            .or_default()
            .names
            .insert(name.to_vec(), g);
    }

    /// This client changed `dir`'s entries (holding its lock): the listing follows.
    pub fn dir_changed(&self, dir: Gfid, name: &[u8], now: Option<Gfid>) {
        let mut i = self.inner.lock().unwrap();
        if let Some(d) = i.dirs.get_mut(&dir) {
            match now {
                Some(g) => d.names.insert(name.to_vec(), g),
                None => d.names.remove(name),
            };
        }
    }

    /// What `name` in `dir` is, if known (the inode a change by name reaches).
    pub fn dir_get(&self, dir: Gfid, name: &[u8]) -> Option<Gfid> {
        self.inner
            .lock()
            .unwrap()
            .dirs
            .get(&dir)?
            .names
            .get(name)
            .copied()
    }

    /// This client wrote `data` at `offset` of `g` (or resized it, with `data` empty), and
    /// the file is `size` bytes now: cached content follows when it is whole and stays
    /// small, else goes.
    pub fn wrote(&self, g: Gfid, offset: u64, data: &[u8], size: u64) {
        let mut i = self.inner.lock().unwrap();
        let Some(old) = i.data.remove(&g) else { return };
        i.data_bytes -= old.len();
        let end = offset.saturating_add(data.len() as u64);
        // A write leaves the file as long as its end or as it was; anything else means the
        // cached copy was not the file.
        let adds_up = data.is_empty() || size == end.max(old.len() as u64);
        if size > SMALL_FILE || !adds_up {
            return;
        }
        let mut new = old.to_vec();
        new.resize(size as usize, 0);
        if !data.is_empty() {
            new[offset as usize..end as usize].copy_from_slice(data);
        }
        if i.data_bytes + new.len() <= DATA_BYTES {
            i.data_bytes += new.len();
            i.data.insert(g, pb::Bytes::from(new));
        }
    }

    /// `g`'s content changed (this client changed it): its cached data goes.
    pub fn drop_data(&self, g: Gfid) {
        let mut i = self.inner.lock().unwrap();
        if let Some(d) = i.data.remove(&g) {
            i.data_bytes -= d.len();
        }
    }

    /// `g`'s attributes changed (this client changed them): they go, its lease and entries
    /// stay.
    pub fn touch(&self, g: Gfid) {
        let mut i = self.inner.lock().unwrap();
        i.attrs.remove(&g);
    }

    pub fn data(&self, g: Gfid, ok: impl Trust) -> Option<pb::Bytes> {
        let i = self.inner.lock().unwrap();
        if !Self::leased(&i, g, &ok) {
            return None;
        }
        i.data.get(&g).cloned()
    }

    /// Keeps the whole content of small file `g`.
    pub fn put_data(&self, ticket: u64, g: Gfid, data: pb::Bytes) {
        let mut i = self.inner.lock().unwrap();
        if !i.fresh(ticket, g) || !i.leases.contains_key(&g) || data.len() as u64 > SMALL_FILE {
            return;
        }
        if i.data_bytes + data.len() > DATA_BYTES {
            i.data.clear();
            i.data_bytes = 0;
        }
        i.data_bytes += data.len();
        if let Some(old) = i.data.insert(g, data) {
            i.data_bytes -= old.len();
        }
    }

    /// Opens `g` through its lease: its attributes, without asking the bricks; `None` when
    /// it is not leased (the open goes to the bricks).
    pub fn open(&self, g: Gfid, ok: impl Trust) -> Option<(pb::Attr, Vec<String>)> {
        let mut i = self.inner.lock().unwrap();
        if !Self::leased(&i, g, &ok) {
            return None;
        }
        let a = i.attrs.get(&g).cloned()?;
        i.opens.entry(g).or_default().local += 1;
        Some(a)
    }

    /// Ends an open made by [`Cache::open`]: the bricks on which a recall made it count,
    /// where it is to be released.
    pub fn close(&self, g: Gfid) -> Vec<Grant> {
        let mut i = self.inner.lock().unwrap();
        let Some(o) = i.opens.get_mut(&g) else {
            return Vec::new();
        };
        // Every registration counted all the local opens of its time: this open is among
        // those a brick counts when that brick counts as many as there are.
        let mut out = Vec::new();
        for (b, n) in o.registered.iter_mut() {
            if *n == o.local {
                *n -= 1;
                out.push(b.clone());
            }
        }
        o.registered.retain(|_, n| *n > 0);
        o.local = o.local.saturating_sub(1);
        if o.local == 0 {
            i.opens.remove(&g);
        }
        out
    }

    /// Whether any file is open through a lease.
    pub fn any_open(&self) -> bool {
        !self.inner.lock().unwrap().opens.is_empty()
    }

    /// How many opens of `g` made through leases brick `on` does not count yet; from now
    /// on they count as counted there (the caller tells the brick).
    pub fn to_count(&self, g: Gfid, on: &Grant) -> u32 {
        let mut i = self.inner.lock().unwrap();
        let Some(o) = i.opens.get_mut(&g) else {
            return 0;
        };
        let n = o.registered.entry(on.clone()).or_default();
        let more = o.local - *n;
        *n = o.local;
        more
    }

    /// Brick `from` recalls `gfids`: all that is cached of them goes. The answer lists the
    /// files open through leases that this brick does not count yet (once per open).
    pub fn recall(&self, from: &Grant, gfids: &[Gfid]) -> Vec<Gfid> {
        let mut i = self.inner.lock().unwrap();
        let mut open = Vec::new();
        for g in gfids {
            i.drop_inode(*g);
            if let Some(o) = i.opens.get_mut(g) {
                let n = o.registered.entry(from.clone()).or_default();
                for _ in *n..o.local {
                    open.push(*g);
                }
                *n = o.local;
            }
        }
        open
    }

    /// This client changed `gfids`: what reads begun before bring of them is not kept (it
    /// may predate the change); what is cached stays, for the caller to bring up to date.
    pub fn changed(&self, gfids: &[Gfid]) {
        let mut i = self.inner.lock().unwrap();
        for g in gfids {
            i.refuse_older(*g);
        }
    }

    /// This client is changing `gfids` itself, or could not tell how a change ended: what
    /// it had cached of them goes (replies on their way included).
    pub fn forget(&self, gfids: &[Gfid]) {
        let mut i = self.inner.lock().unwrap();
        for g in gfids {
            i.drop_inode(*g);
        }
    }

    /// Inodes whose attributes are cached with more than one link: one of them may be
    /// what an unlink or rename by name reached when the cache did not know that name.
    pub fn linked(&self) -> Vec<Gfid> {
        let i = self.inner.lock().unwrap();
        i.attrs
            .iter()
            .filter(|(_, (a, _))| a.nlink > 1)
            .map(|(g, _)| *g)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(n: u8) -> Gfid {
        Gfid::from_bytes(&[n; 16]).unwrap()
    }

    fn attr(n: u8, size: u64) -> pb::Attr {
        pb::Attr {
            gfid: g(n).to_vec(),
            size,
            ..Default::default()
        }
    }

    fn grants() -> Vec<Grant> {
        vec![("b0".into(), 1), ("b1".into(), 1)]
    }

    fn yes(_: &[Grant]) -> bool {
        true
    }

    #[test]
    fn a_reply_that_crossed_a_recall_is_not_cached() {
        let c = Cache::default();
        let t = c.ticket();
        c.recall(&("b0".into(), 1), &[g(1)]);
        c.put_attr(t, g(1), attr(1, 5), vec![], grants());
        assert!(c.attr(g(1), yes).is_none());
        let t = c.ticket();
        c.put_attr(t, g(1), attr(1, 5), vec![], grants());
        assert_eq!(c.attr(g(1), yes).unwrap().0.size, 5);
    }

    #[test]
    fn nothing_is_served_without_enough_leases() {
        let c = Cache::default();
        let t = c.ticket();
        c.put_attr(t, g(1), attr(1, 5), vec![], grants());
        assert!(c.attr(g(1), |_: &[Grant]| false).is_none());
        assert!(c.open(g(1), |_: &[Grant]| false).is_none());
        assert!(c.data(g(1), |_: &[Grant]| false).is_none());
    }

    #[test]
    fn a_recall_drops_attributes_listing_and_data() {
        let c = Cache::default();
        let t = c.ticket();
        c.put_attr(t, g(1), attr(1, 3), vec![], grants());
        c.put_dir(t, g(1), [(b"x".to_vec(), g(2))]);
        c.put_data(t, g(1), pb::Bytes::from_static(b"abc"));
        assert_eq!(c.entry(g(1), b"x", yes), Some(Some(g(2))));
        assert_eq!(c.entry(g(1), b"y", yes), Some(None));
        assert!(c.data(g(1), yes).is_some());
        c.recall(&("b1".into(), 1), &[g(1)]);
        assert!(c.attr(g(1), yes).is_none());
        assert_eq!(c.entry(g(1), b"x", yes), None);
        assert!(c.data(g(1), yes).is_none());
    }

    #[test]
    fn opens_through_a_lease_are_counted_by_the_recalling_brick_once_each() {
        let c = Cache::default();
        let t = c.ticket();
        c.put_attr(t, g(1), attr(1, 3), vec![], grants());
        assert!(c.open(g(1), yes).is_some());
        assert!(c.open(g(1), yes).is_some());
        let b0: Grant = ("b0".into(), 1);
        assert_eq!(c.recall(&b0, &[g(1)]), vec![g(1), g(1)]);
        assert_eq!(c.recall(&b0, &[g(1)]), vec![], "already counted there");
        // Leased again, opened a third time, recalled by b0 again: one more to count.
        let t = c.ticket();
        c.put_attr(t, g(1), attr(1, 3), vec![], grants());
        assert!(c.open(g(1), yes).is_some());
        assert_eq!(c.recall(&b0, &[g(1)]), vec![g(1)]);
        // Three closes release three opens on b0, none elsewhere.
        let released: usize = (0..3).map(|_| c.close(g(1)).len()).sum();
        assert_eq!(released, 3);
        assert!(c.close(g(1)).is_empty());
    }

    #[test]
    fn an_open_not_counted_anywhere_releases_nothing() {
        let c = Cache::default();
        let t = c.ticket();
        c.put_attr(t, g(1), attr(1, 3), vec![], grants());
        assert!(c.open(g(1), yes).is_some());
        assert!(c.close(g(1)).is_empty());
    }

    #[test]
    fn own_changes_keep_a_listing_whole() {
        let c = Cache::default();
        let t = c.ticket();
        c.put_lease(t, g(1), grants());
        c.put_dir(t, g(1), []);
        assert_eq!(c.entry(g(1), b"f", yes), Some(None));
        c.dir_changed(g(1), b"f", Some(g(2)));
        assert_eq!(c.entry(g(1), b"f", yes), Some(Some(g(2))));
        c.dir_changed(g(1), b"f", None);
        assert_eq!(c.entry(g(1), b"f", yes), Some(None));
    }

    #[test]
    fn entries_found_one_by_one_say_nothing_of_missing_names() {
        let c = Cache::default();
        let t = c.ticket();
        c.put_lease(t, g(1), grants());
        c.put_entry(t, g(1), b"a", g(2));
        assert_eq!(c.entry(g(1), b"a", yes), Some(Some(g(2))));
        assert_eq!(c.entry(g(1), b"b", yes), None);
    }

    #[test]
    fn own_writes_keep_a_small_file_whole() {
        let c = Cache::default();
        let t = c.ticket();
        c.put_attr(t, g(1), attr(1, 0), vec![], grants());
        c.put_data(t, g(1), pb::Bytes::new());
        c.wrote(g(1), 0, b"abc", 3);
        c.wrote(g(1), 5, b"z", 6);
        assert_eq!(&c.data(g(1), yes).unwrap()[..], b"abc\0\0z");
        c.wrote(g(1), 0, b"", 2);
        assert_eq!(&c.data(g(1), yes).unwrap()[..], b"ab");
        c.wrote(g(1), 0, &vec![1u8; SMALL_FILE as usize + 1], SMALL_FILE + 1);
        assert!(c.data(g(1), yes).is_none(), "no longer small");
        let t = c.ticket();
        c.put_data(t, g(1), pb::Bytes::from_static(b"ab"));
        // A size that does not add up: the cached copy was not the file; it goes.
        c.wrote(g(1), 0, b"q", 9);
        assert!(c.data(g(1), yes).is_none());
    }

    #[test]
    fn a_read_begun_before_an_own_change_is_not_kept() {
        let c = Cache::default();
        let t = c.ticket();
        c.put_attr(t, g(1), attr(1, 3), vec![], grants());
        let before = c.ticket();
        c.changed(&[g(1)]);
        c.put_data(before, g(1), pb::Bytes::from_static(b"old"));
        assert!(c.data(g(1), yes).is_none());
        c.put_attr(before, g(1), attr(1, 3), vec![], grants());
        c.put_data(c.ticket(), g(1), pb::Bytes::from_static(b"new"));
        assert_eq!(&c.data(g(1), yes).unwrap()[..], b"new");
    }

    #[test]
    fn a_listing_needs_its_lease() {
        let c = Cache::default();
        let t = c.ticket();
        c.put_dir(t, g(1), [(b"x".to_vec(), g(2))]);
        assert_eq!(c.entry(g(1), b"x", yes), None);
    }
}
