//! Leases: what lets a client cache an inode's attributes, its directory entries and its
//! data, and serve them without asking the bricks, until another session is about to change
//! the inode.
//!
//! A session holds a lease on an inode from the moment this brick grants it (with a read of
//! the inode, always granted before the read) until it gives it back in answer to a recall.
//! Before another session's change, the brick recalls the leases on what the change touches
//! and waits for them to come back: at lock time for the inodes locked (every change holds
//! their locks, see `locks`), and at the change for the inodes it reaches by name (an
//! unlink's victim, a rename's moved and replaced inodes, a link's target), which are fenced
//! meanwhile. No lease is granted on an inode another session has locked or that is fenced.
//!
//! A client that does not answer is not waited for without end. A session that ends without
//! closing keeps its leases until `lease window` after the brick last heard from it; a live
//! session that does not answer a recall within its window is ended (`Recall::Broken`). The
//! client trusts a lease only until its window after it sent the last ping this brick
//! answered, so by then it has stopped using what it cached (`mortar_replication::lease`).
//!
//! Together with majority quorum this gives close-to-open, and more: a change acknowledged
//! to a writer was applied on a majority of copies, a reader trusts its cache only under
//! leases from a majority, two majorities share a brick, and that brick recalled the
//! reader's lease before it applied the change.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use mortar_common::gfid::Gfid;
use mortar_proto as pb;
use tokio::sync::{Notify, mpsc};
use tonic::Status;

use crate::locks::SessionId;

/// The longest lease window a client may ask for: a hostile client must not stall writers
/// for long.
pub const MAX_WINDOW: Duration = Duration::from_secs(30);
/// Leases one session may hold; past it, nothing more is granted (the client asks the
/// bricks again). About 100 bytes each.
const SESSION_LEASES: usize = 256 << 10;
/// Leases the brick holds for all sessions together.
const TOTAL_LEASES: usize = 2 << 20;

type Tx = mpsc::Sender<Result<pb::SessionOut, Status>>;

struct Holder {
    window: Duration,
    last_heard: Instant,
    tx: Tx,
    /// The session ended without closing: its leases last until `last_heard + window`.
    ended: bool,
    gfids: HashSet<Gfid>,
    /// Recalls sent and not answered yet, with when they were sent.
    recalling: HashMap<Gfid, Instant>,
}

impl Holder {
    fn expiry(&self) -> Instant {
        self.last_heard + self.window
    }
}

#[derive(Default)]
struct Table {
    holders: HashMap<SessionId, Holder>,
    by_gfid: HashMap<Gfid, Vec<SessionId>>,
    /// Inodes a change reaches by name, while it recalls and applies: no grants.
    fenced: HashMap<Gfid, u32>,
    total: usize,
}

impl Table {
    fn drop_lease(&mut self, s: SessionId, g: Gfid) {
        if let Some(list) = self.by_gfid.get_mut(&g) {
            let before = list.len();
            list.retain(|x| *x != s);
            self.total -= before - list.len();
            if list.is_empty() {
                self.by_gfid.remove(&g);
            }
        }
        if let Some(h) = self.holders.get_mut(&s) {
            h.gfids.remove(&g);
            h.recalling.remove(&g);
        }
    }

    fn drop_holder(&mut self, s: SessionId) {
        if let Some(h) = self.holders.remove(&s) {
            for g in h.gfids {
                if let Some(list) = self.by_gfid.get_mut(&g) {
                    list.retain(|x| *x != s);
                    self.total -= 1;
                    if list.is_empty() {
                        self.by_gfid.remove(&g);
                    }
                }
            }
        }
    }
}

#[derive(Default)]
pub struct Leases {
    table: Mutex<Table>,
    /// Woken whenever leases are given back or dropped.
    changed: Notify,
}

/// What became of a recall's holders that had to be given up on.
#[derive(Debug, Default)]
pub struct Recalled {
    /// Live sessions that did not answer within their window (the caller ends them).
    pub broken: Vec<SessionId>,
}

impl Leases {
    /// A session starts; `window` 0 asks for no leases.
    pub fn register(&self, s: SessionId, window: Duration, tx: Tx) {
        if window.is_zero() {
            return;
        }
        let mut t = self.table.lock().unwrap();
        // Sessions gone whose leases ran out go now (a session start is rare enough).
        let now = Instant::now();
        let gone: Vec<SessionId> = t
            .holders
            .iter()
            .filter(|(_, h)| h.ended && h.expiry() <= now)
            .map(|(s, _)| *s)
            .collect();
        gone.into_iter().for_each(|s| t.drop_holder(s));
        t.holders.insert(
            s,
            Holder {
                window: window.min(MAX_WINDOW),
                last_heard: Instant::now(),
                tx,
                ended: false,
                gfids: HashSet::new(),
                recalling: HashMap::new(),
            },
        );
    }

    /// A message came from session `s`.
    pub fn heard(&self, s: SessionId) {
        if let Some(h) = self.table.lock().unwrap().holders.get_mut(&s) {
            h.last_heard = Instant::now();
        }
    }

    /// Session `s` ended. Closed by its client: its leases go now. Otherwise they last
    /// until the client has stopped trusting them.
    pub fn ended(&self, s: SessionId, closed: bool) {
        let mut t = self.table.lock().unwrap();
        if closed {
            t.drop_holder(s);
        } else if let Some(h) = t.holders.get_mut(&s) {
            h.ended = true;
            if h.gfids.is_empty() {
                t.holders.remove(&s);
            }
        }
        drop(t);
        self.changed.notify_waiters();
    }

    /// Grants `s` leases on `gfids`, all or none; `locked_by_other(g)` tells whether another
    /// session holds `g`'s lock. Called before the inodes are read.
    pub fn grant(
        &self,
        s: SessionId,
        gfids: &[Gfid],
        locked_by_other: impl Fn(Gfid) -> bool,
    ) -> bool {
        let mut t = self.table.lock().unwrap();
        let t = &mut *t;
        if gfids
            .iter()
            .any(|g| t.fenced.contains_key(g) || locked_by_other(*g))
        {
            return false;
        }
        let Some(h) = t.holders.get_mut(&s) else {
            return false;
        };
        let new: Vec<Gfid> = gfids
            .iter()
            .copied()
            .filter(|g| !h.gfids.contains(g))
            .collect();
        if h.ended
            || h.gfids.len() + new.len() > SESSION_LEASES
            || t.total + new.len() > TOTAL_LEASES
        {
            return false;
        }
        for g in new {
            h.gfids.insert(g);
            t.by_gfid.entry(g).or_default().push(s);
            t.total += 1;
        }
        true
    }

    /// Whether any session but `s` may hold leases, now or from a grant racing with the
    /// caller (a cheap test before looking up what a change reaches by name).
    pub fn others_registered(&self, s: SessionId) -> bool {
        let t = self.table.lock().unwrap();
        t.holders.keys().any(|x| *x != s)
    }

    /// Stops grants on `gfids` until [`Leases::unfence`].
    pub fn fence(&self, gfids: &[Gfid]) {
        let mut t = self.table.lock().unwrap();
        for g in gfids {
            *t.fenced.entry(*g).or_insert(0) += 1;
        }
    }

    pub fn unfence(&self, gfids: &[Gfid]) {
        let mut t = self.table.lock().unwrap();
        for g in gfids {
            if let Some(n) = t.fenced.get_mut(g) {
                *n -= 1;
                if *n == 0 {
                    t.fenced.remove(g);
                }
            }
        }
    }

    /// `s` gives back its leases on `gfids` (its answer to a recall).
    pub fn returned(&self, s: SessionId, gfids: &[Gfid]) {
        let mut t = self.table.lock().unwrap();
        for g in gfids {
            t.drop_lease(s, *g);
        }
        drop(t);
        self.changed.notify_waiters();
    }

    /// Recalls every lease on `gfids` held by a session other than `except`, and waits
    /// until each is given back or has run out.
    pub async fn recall(&self, except: Option<SessionId>, gfids: &[Gfid]) -> Recalled {
        let mut out = Recalled::default();
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let mut sends: HashMap<SessionId, (Tx, Vec<Gfid>)> = HashMap::new();
            let wait_until = {
                let mut t = self.table.lock().unwrap();
                let now = Instant::now();
                let mut holders: Vec<(SessionId, Gfid)> = Vec::new();
                for g in gfids {
                    for s in t.by_gfid.get(g).into_iter().flatten() {
                        if Some(*s) != except {
                            holders.push((*s, *g));
                        }
                    }
                }
                let mut until: Option<Instant> = None;
                for (s, g) in holders {
                    let Some(h) = t.holders.get_mut(&s) else {
                        continue;
                    };
                    if !h.ended {
                        let sent = *h.recalling.entry(g).or_insert_with(|| {
                            sends
                                .entry(s)
                                .or_insert_with(|| (h.tx.clone(), Vec::new()))
                                .1
                                .push(g);
                            now
                        });
                        if sent + h.window > now {
                            let d = sent + h.window;
                            until = Some(until.map_or(d, |u| u.min(d)));
                            continue;
                        }
                        // A live session that does not answer a recall is broken; it is
                        // ended, and its leases run out like any ended session's.
                        h.ended = true;
                        out.broken.push(s);
                    }
                    let d = h.expiry();
                    if d <= now {
                        // Run out: the client stopped trusting it by now.
                        t.drop_lease(s, g);
                    } else {
                        until = Some(until.map_or(d, |u| u.min(d)));
                    }
                }
                until
            };
            let Some(until) = wait_until else {
                return out;
            };
            for (s, (tx, gs)) in sends {
                let msg = pb::SessionOut {
                    msg: Some(pb::session_out::Msg::Recall(pb::Recall {
                        gfids: gs.iter().map(|g| g.to_vec()).collect(),
                    })),
                };
                if tx.try_send(Ok(msg)).is_err() {
                    // Its session stream is full or gone: it cannot hear the recall.
                    let mut t = self.table.lock().unwrap();
                    if let Some(h) = t.holders.get_mut(&s)
                        && !h.ended
                    {
                        h.ended = true;
                        out.broken.push(s);
                    }
                }
            }
            let _ = tokio::time::timeout_at(until, changed).await;
        }
    }

    /// Leases held now (for metrics).
    pub fn count(&self) -> usize {
        self.table.lock().unwrap().total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sid(n: u8) -> SessionId {
        [n; 16]
    }

    fn g(n: u8) -> Gfid {
        Gfid::from_bytes(&[n; 16]).unwrap()
    }

    #[tokio::test]
    async fn a_recall_waits_for_the_holder_to_give_the_lease_back() {
        let l = std::sync::Arc::new(Leases::default());
        let (tx, mut rx) = mpsc::channel(8);
        l.register(sid(1), Duration::from_secs(5), tx);
        assert!(l.grant(sid(1), &[g(1)], |_| false));
        let l2 = l.clone();
        let recall = tokio::spawn(async move { l2.recall(Some(sid(2)), &[g(1)]).await });
        let msg = rx.recv().await.unwrap().unwrap();
        assert!(
            matches!(msg.msg, Some(pb::session_out::Msg::Recall(r)) if r.gfids == vec![g(1).to_vec()])
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !recall.is_finished(),
            "the recall returned before the lease came back"
        );
        l.returned(sid(1), &[g(1)]);
        let r = tokio::time::timeout(Duration::from_secs(1), recall)
            .await
            .unwrap()
            .unwrap();
        assert!(r.broken.is_empty());
        assert_eq!(l.count(), 0);
    }

    #[tokio::test]
    async fn the_changing_session_is_not_recalled() {
        let l = Leases::default();
        let (tx, mut rx) = mpsc::channel(8);
        l.register(sid(1), Duration::from_secs(5), tx);
        assert!(l.grant(sid(1), &[g(1)], |_| false));
        tokio::time::timeout(Duration::from_secs(1), l.recall(Some(sid(1)), &[g(1)]))
            .await
            .unwrap();
        assert!(rx.try_recv().is_err());
        assert_eq!(l.count(), 1);
    }

    #[test]
    fn no_grant_on_an_inode_locked_by_another_or_fenced_or_past_the_session_end() {
        let l = Leases::default();
        let (tx, _rx) = mpsc::channel(8);
        l.register(sid(1), Duration::from_secs(5), tx);
        assert!(
            !l.grant(sid(1), &[g(1), g(2)], |x| x == g(2)),
            "g2 is locked by another"
        );
        assert_eq!(l.count(), 0, "all or none");
        l.fence(&[g(3)]);
        assert!(!l.grant(sid(1), &[g(3)], |_| false));
        l.unfence(&[g(3)]);
        assert!(l.grant(sid(1), &[g(3)], |_| false));
        assert!(
            !l.grant(sid(9), &[g(3)], |_| false),
            "an unknown session gets none"
        );
        l.ended(sid(1), false);
        assert!(
            !l.grant(sid(1), &[g(4)], |_| false),
            "an ended session gets none"
        );
        assert_eq!(l.count(), 1, "its lease lasts until it runs out");
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_of_a_session_gone_without_closing_runs_out_after_its_window() {
        let l = Leases::default();
        let (tx, _rx) = mpsc::channel(8);
        l.register(sid(1), Duration::from_secs(3), tx);
        assert!(l.grant(sid(1), &[g(1)], |_| false));
        l.ended(sid(1), false);
        let t0 = tokio::time::Instant::now();
        let r = l.recall(None, &[g(1)]).await;
        let waited = t0.elapsed();
        assert!(
            waited >= Duration::from_secs(2) && waited <= Duration::from_secs(4),
            "{waited:?}"
        );
        assert!(r.broken.is_empty());
        assert_eq!(l.count(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_live_session_that_does_not_answer_is_reported_broken() {
        let l = Leases::default();
        let (tx, _rx) = mpsc::channel(8);
        l.register(sid(1), Duration::from_secs(2), tx);
        assert!(l.grant(sid(1), &[g(1)], |_| false));
        let r = l.recall(None, &[g(1)]).await;
        assert_eq!(r.broken, vec![sid(1)]);
        assert_eq!(l.count(), 0);
    }

    #[test]
    fn a_closed_session_gives_its_leases_back_at_once() {
        let l = Leases::default();
        let (tx, _rx) = mpsc::channel(8);
        l.register(sid(1), Duration::from_secs(5), tx);
        assert!(l.grant(sid(1), &[g(1), g(2)], |_| false));
        l.ended(sid(1), true);
        assert_eq!(l.count(), 0);
    }
}
