//! The decisions of replication, as pure functions of what the bricks answered: which
//! copies are fresh, what a change's replies add up to, which entry a lookup returns,
//! which copy heals which, and when copies contradict each other (split brain). The
//! transaction, read and heal modules gather the answers and act; nothing here does I/O.

use mortar_common::error::{Error, Result};
use mortar_proto as pb;

/// An inode version as the bricks store it. Versions are ordered by (term, seq) alone;
/// two copies with the same (term, seq) but different change ids contradict each other.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ver {
    pub term: u64,
    pub seq: u64,
    pub id: u64,
}

impl Ver {
    /// What versions are ordered by (see `freshness`).
    pub fn key(&self) -> (u64, u64) {
        (self.term, self.seq)
    }
}

pub fn ver_of(v: Option<pb::Version>) -> Ver {
    v.map(|v| Ver {
        term: v.term,
        seq: v.seq,
        id: v.id,
    })
    .unwrap_or_default()
}

pub fn pver(v: Ver) -> Option<pb::Version> {
    Some(pb::Version {
        term: v.term,
        seq: v.seq,
        id: v.id,
    })
}

/// One copy of an inode, as its brick describes it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Copy {
    pub ver: Ver,
    /// A change began on this copy and did not finish (its brick died in the middle): the
    /// content may be anything between `ver` and the change's result.
    pub pending: bool,
}

impl Copy {
    pub fn of(a: &pb::Attr) -> Copy {
        Copy {
            ver: ver_of(a.ver),
            pending: a.pending,
        }
    }
}

/// Which copies are at the newest version.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fresh {
    pub ver: Ver,
    /// At the newest version, with nothing unfinished: they agree.
    pub clean: Vec<usize>,
    /// At the newest version but with a change unfinished (what every copy looks like when
    /// all bricks died in the middle of a change).
    pub dirty: Vec<usize>,
}

impl Fresh {
    /// Every copy is at the newest version and clean: nothing to heal.
    pub fn in_sync(&self, copies: usize) -> bool {
        self.clean.len() == copies
    }
}

/// The newest version among `copies` and who holds it. Two clean copies at the same
/// (term, seq) with different change ids contradict each other: split brain. A dirty copy
/// never makes a split brain: its change was never acknowledged, so any result is allowed.
pub fn freshness(copies: &[Copy]) -> Result<Fresh> {
    let Some(max) = copies.iter().map(|c| c.ver.key()).max() else {
        return Ok(Fresh::default());
    };
    let at_max = |pending: bool| -> Vec<usize> {
        (0..copies.len())
            .filter(|i| copies[*i].ver.key() == max && copies[*i].pending == pending)
            .collect()
    };
    let (clean, dirty) = (at_max(false), at_max(true));
    let ver = copies[*clean.first().or(dirty.first()).unwrap()].ver;
    if clean.iter().any(|i| copies[*i].ver.id != ver.id) {
        return Err(Error::SplitBrain);
    }
    Ok(Fresh { ver, clean, dirty })
}

/// The copies a change may be applied to: the clean newest ones, a majority of the volume
/// at least (else heal must run first: `NoGoodCopy`).
pub fn writable(copies: &[Copy], quorum: usize) -> Result<(Ver, Vec<usize>)> {
    let f = freshness(copies)?;
    if f.clean.len() < quorum {
        return Err(Error::NoGoodCopy);
    }
    Ok((f.ver, f.clean))
}

/// The copies a read may use, and whether the inode needs a heal. Clean newest copies if
/// there are any; else the dirty newest ones: each holds a state some unacknowledged change
/// may have left, and a heal will make them one.
pub fn readable(copies: &[Copy]) -> Result<(Ver, Vec<usize>, bool)> {
    let f = freshness(copies)?;
    let heal = !f.in_sync(copies.len());
    let use_ = if f.clean.is_empty() { f.dirty } else { f.clean };
    Ok((f.ver, use_, heal))
}

/// What one brick answered to a change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reply {
    Applied,
    /// Refused with this errno (ENOTEMPTY, EDQUOT, ...): the copy is unchanged.
    Refused(i32),
    /// The copy was not at the expected version, or the lock was gone: left to heal.
    Stale,
    /// No answer (transport error).
    Lost,
}

/// What a change's replies add up to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// `Ok(i)`: the change counts and reply `i` is its answer; else the error to return.
    pub result: std::result::Result<usize, Error>,
    /// The copies that stay members of the transaction (they agree with each other).
    pub members: Vec<usize>,
    /// The members moved to the change's new version.
    pub advanced: bool,
}

/// A change counts when a majority applied it. A majority that refused it the same way is
/// the answer (the change failed everywhere it counts, nothing moved). A minority that
/// applied it is ahead of the others: the change failed, and those copies become the
/// members (they hold the newest version), for heal to level the rest.
pub fn mutation_outcome(replies: &[Reply], quorum: usize) -> Outcome {
    let applied: Vec<usize> = (0..replies.len())
        .filter(|i| replies[*i] == Reply::Applied)
        .collect();
    if applied.len() >= quorum {
        return Outcome {
            result: Ok(applied[0]),
            members: applied,
            advanced: true,
        };
    }
    let mut by_errno: Vec<(i32, Vec<usize>)> = Vec::new();
    for (i, r) in replies.iter().enumerate() {
        if let Reply::Refused(e) = r {
            match by_errno.iter_mut().find(|(x, _)| x == e) {
                Some((_, v)) => v.push(i),
                None => by_errno.push((*e, vec![i])),
            }
        }
    }
    if let Some((e, ms)) = by_errno.iter().find(|(_, ms)| ms.len() >= quorum) {
        return Outcome {
            result: Err(Error::Os(*e)),
            members: ms.clone(),
            advanced: false,
        };
    }
    if !applied.is_empty() {
        return Outcome {
            result: Err(Error::NoQuorum {
                have: applied.len(),
                need: quorum,
            }),
            members: applied,
            advanced: true,
        };
    }
    Outcome {
        result: Err(Error::NoQuorum {
            have: by_errno.iter().map(|(_, v)| v.len()).max().unwrap_or(0),
            need: quorum,
        }),
        members: Vec::new(),
        advanced: false,
    }
}

/// One brick's answer to a lookup: its copy of the parent directory (if it has one) and of
/// the entry (gfid and copy), else the errno.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LookupView {
    pub parent: Option<Copy>,
    pub entry: Option<(Vec<u8>, Copy)>,
    pub errno: i32,
}

/// The outcome of a lookup vote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vote {
    /// `Ok(i)`: reply `i`'s entry is the answer; `Err(errno)`: the name does not resolve.
    pub answer: std::result::Result<usize, i32>,
    /// The replies holding the answer's entry at its version (to read it from).
    pub holders: Vec<usize>,
    /// The parent's copies disagree or some brick lacks it: heal the parent.
    pub heal_parent: bool,
}

/// Decides a lookup: only the bricks with the newest copy of the parent directory have a
/// say (a brick that missed a create or a delete is outvoted), and among them the newest
/// copy of the entry wins. `None`: no brick has the parent.
pub fn lookup_vote(replies: &[LookupView]) -> Option<Vote> {
    let idx: Vec<usize> = (0..replies.len())
        .filter(|i| replies[*i].parent.is_some())
        .collect();
    if idx.is_empty() {
        return None;
    }
    let parents: Vec<Copy> = idx.iter().map(|i| replies[*i].parent.unwrap()).collect();
    // Contradicting parents: the entries of the clean ones still answer (the split brain
    // is the parent's heal's to report); `freshness` would refuse them all.
    let (auth, heal_parent) = match freshness(&parents) {
        Ok(f) => {
            let heal = !f.in_sync(replies.len());
            let who = if f.clean.is_empty() { f.dirty } else { f.clean };
            (who.into_iter().map(|k| idx[k]).collect::<Vec<_>>(), heal)
        }
        Err(_) => {
            let max = parents.iter().map(|c| c.ver.key()).max().unwrap();
            let who = idx
                .iter()
                .copied()
                .filter(|i| replies[*i].parent.unwrap().ver.key() == max)
                .collect();
            (who, true)
        }
    };
    // Reversed: `max_by_key` keeps the last of equals, and the first brick should answer.
    let best = auth
        .iter()
        .rev()
        .copied()
        .filter(|i| replies[*i].entry.is_some())
        .max_by_key(|i| {
            let (_, c) = replies[*i].entry.as_ref().unwrap();
            (c.ver.key(), !c.pending)
        });
    let Some(best) = best else {
        let e = replies[auth[0]].errno;
        return Some(Vote {
            answer: Err(if e == 0 { libc::EIO } else { e }),
            holders: vec![],
            heal_parent,
        });
    };
    let won = replies[best].entry.clone();
    let holders = auth
        .iter()
        .copied()
        .filter(|i| replies[*i].entry == won)
        .collect();
    Some(Vote {
        answer: Ok(best),
        holders,
        heal_parent,
    })
}

/// Which copy wins a heal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// The newest version; contradicting copies are split brain and left alone.
    Newest,
    /// This brick's copy (to settle a split brain).
    Brick(String),
    /// The copy with the latest mtime.
    Mtime,
    /// The largest copy.
    Size,
}

/// Whether a copy needs healing from `src`: another version, an unfinished change on
/// either, or (for copies a heal has just created, which start at the source's initial
/// version) other attributes.
pub fn differs(a: &pb::Attr, src: &pb::Attr) -> bool {
    Copy::of(a) != Copy::of(src)
        || a.pending
        || (a.mode, a.uid, a.gid, a.mtime_ns) != (src.mode, src.uid, src.gid, src.mtime_ns)
        || (a.kind() == pb::Kind::File && a.size != src.size)
}

/// A heal's plan for one inode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealPlan {
    /// The copy the others are made like.
    pub source: usize,
    pub sinks: Vec<usize>,
    /// Every copy gets one new version at the end (above all the old ones): a split brain
    /// settled by a choice, or copies that all stopped in the middle of a change.
    pub new_version: bool,
}

/// Chooses a heal's source and sinks among the copies present (`bricks[i]` holds
/// `attrs[i]`; `all_present`: every brick of the volume has a copy here). With
/// `Source::Newest`, the clean newest copy wins; when every newest copy is dirty (all bricks
/// died in the middle of a change that was never acknowledged), the first of them wins and
/// all get a new version, so they end identical and clean — but only with every copy
/// present: a brick still away may hold a clean one (`NoGoodCopy` until it is back).
pub fn heal_plan(
    source: &Source,
    bricks: &[&str],
    attrs: &[&pb::Attr],
    all_present: bool,
) -> Result<HealPlan> {
    let copies: Vec<Copy> = attrs.iter().map(|a| Copy::of(a)).collect();
    let n = attrs.len();
    let (source, forced) = match source {
        Source::Newest => {
            let f = freshness(&copies)?;
            match f.clean.first() {
                Some(i) => (*i, false),
                None if all_present => (f.dirty[0], true),
                None => return Err(Error::NoGoodCopy),
            }
        }
        Source::Brick(id) => (
            bricks.iter().position(|b| b == id).ok_or_else(|| {
                Error::Volfile(format!(
                    "brick {id} has no copy of this file, or is not reachable"
                ))
            })?,
            true,
        ),
        Source::Mtime => ((0..n).max_by_key(|i| attrs[*i].mtime_ns).unwrap(), true),
        Source::Size => ((0..n).max_by_key(|i| attrs[*i].size).unwrap(), true),
    };
    let sinks = (0..n)
        .filter(|i| *i != source && (forced || differs(attrs[*i], attrs[source])))
        .collect();
    Ok(HealPlan {
        source,
        sinks,
        new_version: forced,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(term: u64, seq: u64, id: u64) -> Ver {
        Ver { term, seq, id }
    }
    fn clean(term: u64, seq: u64, id: u64) -> Copy {
        Copy {
            ver: v(term, seq, id),
            pending: false,
        }
    }
    fn dirty(term: u64, seq: u64, id: u64) -> Copy {
        Copy {
            ver: v(term, seq, id),
            pending: true,
        }
    }

    #[test]
    fn freshness_table() {
        // (copies, expected: Ok((ver, clean, dirty)) or Err(split brain))
        type Want = Option<(Ver, Vec<usize>, Vec<usize>)>;
        let cases: Vec<(&str, Vec<Copy>, Want)> = vec![
            ("no copies", vec![], Some((Ver::default(), vec![], vec![]))),
            (
                "all agree",
                vec![clean(1, 2, 9); 3],
                Some((v(1, 2, 9), vec![0, 1, 2], vec![])),
            ),
            (
                "one stale",
                vec![clean(1, 2, 9), clean(1, 1, 8), clean(1, 2, 9)],
                Some((v(1, 2, 9), vec![0, 2], vec![])),
            ),
            (
                "higher term wins over higher seq",
                vec![clean(1, 9, 1), clean(2, 1, 2)],
                Some((v(2, 1, 2), vec![1], vec![])),
            ),
            (
                "same version, other change: split brain",
                vec![clean(1, 2, 9), clean(1, 2, 7)],
                None,
            ),
            (
                "a dirty copy at the newest version is not clean",
                vec![clean(1, 2, 9), dirty(1, 2, 9), clean(1, 2, 9)],
                Some((v(1, 2, 9), vec![0, 2], vec![1])),
            ),
            (
                "all died mid-change: all dirty",
                vec![dirty(1, 2, 9); 3],
                Some((v(1, 2, 9), vec![], vec![0, 1, 2])),
            ),
            (
                "a dirty copy with another id is no split brain",
                vec![clean(1, 2, 9), dirty(1, 2, 7)],
                Some((v(1, 2, 9), vec![0], vec![1])),
            ),
            (
                "dirty behind a newer clean copy is just stale",
                vec![dirty(1, 1, 1), clean(1, 2, 2)],
                Some((v(1, 2, 2), vec![1], vec![])),
            ),
        ];
        for (name, copies, want) in cases {
            let got = freshness(&copies).ok().map(|f| (f.ver, f.clean, f.dirty));
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn writable_needs_a_majority_of_clean_newest_copies() {
        let cases: Vec<(
            &str,
            Vec<Copy>,
            usize,
            std::result::Result<Vec<usize>, Error>,
        )> = vec![
            ("3 of 3", vec![clean(1, 1, 1); 3], 2, Ok(vec![0, 1, 2])),
            (
                "2 of 3",
                vec![clean(1, 1, 1), clean(1, 0, 0), clean(1, 1, 1)],
                2,
                Ok(vec![0, 2]),
            ),
            (
                "1 of 3: heal first",
                vec![clean(1, 1, 1), clean(1, 0, 0), clean(1, 0, 0)],
                2,
                Err(Error::NoGoodCopy),
            ),
            (
                "a dirty copy does not count",
                vec![clean(1, 1, 1), dirty(1, 1, 1), clean(1, 0, 0)],
                2,
                Err(Error::NoGoodCopy),
            ),
            (
                "all dirty: heal first",
                vec![dirty(1, 1, 1); 3],
                2,
                Err(Error::NoGoodCopy),
            ),
            (
                "split brain",
                vec![clean(1, 1, 1), clean(1, 1, 2), clean(1, 1, 1)],
                2,
                Err(Error::SplitBrain),
            ),
        ];
        for (name, copies, quorum, want) in cases {
            assert_eq!(writable(&copies, quorum).map(|(_, c)| c), want, "{name}");
        }
    }

    #[test]
    fn readable_prefers_clean_copies_and_falls_back_to_dirty_ones() {
        let cases: Vec<(&str, Vec<Copy>, Vec<usize>, bool)> = vec![
            ("in sync", vec![clean(1, 1, 1); 3], vec![0, 1, 2], false),
            (
                "one stale",
                vec![clean(1, 0, 0), clean(1, 1, 1), clean(1, 1, 1)],
                vec![1, 2],
                true,
            ),
            (
                "one dirty",
                vec![dirty(1, 1, 1), clean(1, 1, 1)],
                vec![1],
                true,
            ),
            (
                "all dirty",
                vec![dirty(1, 1, 1), dirty(1, 1, 1)],
                vec![0, 1],
                true,
            ),
            ("one brick", vec![clean(3, 3, 3)], vec![0], false),
        ];
        for (name, copies, want, heal) in cases {
            let (_, got, h) = readable(&copies).unwrap();
            assert_eq!((got, h), (want, heal), "{name}");
        }
    }

    #[test]
    fn mutation_outcome_table() {
        use Reply::*;
        let e = |x| Error::Os(x);
        let nq = |have, need| Error::NoQuorum { have, need };
        // (replies, quorum, result, members, advanced)
        let cases: Vec<(
            &str,
            Vec<Reply>,
            usize,
            std::result::Result<usize, Error>,
            Vec<usize>,
            bool,
        )> = vec![
            (
                "all applied",
                vec![Applied; 3],
                2,
                Ok(0),
                vec![0, 1, 2],
                true,
            ),
            (
                "majority applied, one lost",
                vec![Lost, Applied, Applied],
                2,
                Ok(1),
                vec![1, 2],
                true,
            ),
            (
                "majority applied, one stale",
                vec![Applied, Stale, Applied],
                2,
                Ok(0),
                vec![0, 2],
                true,
            ),
            (
                "all refused alike",
                vec![Refused(39); 3],
                2,
                Err(e(39)),
                vec![0, 1, 2],
                false,
            ),
            (
                "majority refused alike",
                vec![Refused(122), Lost, Refused(122)],
                2,
                Err(e(122)),
                vec![0, 2],
                false,
            ),
            (
                "minority applied: ahead, change failed",
                vec![Applied, Lost, Lost],
                2,
                Err(nq(1, 2)),
                vec![0],
                true,
            ),
            (
                "minority applied, majority refused: the refusal answers",
                vec![Applied, Refused(28), Refused(28)],
                2,
                Err(e(28)),
                vec![1, 2],
                false,
            ),
            (
                "refusals disagree",
                vec![Refused(28), Refused(122), Lost],
                2,
                Err(nq(1, 2)),
                vec![],
                false,
            ),
            (
                "nothing answered",
                vec![Lost, Lost, Stale],
                2,
                Err(nq(0, 2)),
                vec![],
                false,
            ),
            (
                "single brick applied",
                vec![Applied],
                1,
                Ok(0),
                vec![0],
                true,
            ),
        ];
        for (name, replies, quorum, result, members, advanced) in cases {
            let o = mutation_outcome(&replies, quorum);
            assert_eq!(
                o,
                Outcome {
                    result,
                    members,
                    advanced
                },
                "{name}"
            );
        }
    }

    fn lv(parent: Option<Copy>, entry: Option<(u8, Copy)>, errno: i32) -> LookupView {
        LookupView {
            parent,
            entry: entry.map(|(g, c)| (vec![g; 16], c)),
            errno,
        }
    }

    #[test]
    fn lookup_vote_table() {
        let p1 = Some(clean(1, 1, 1));
        let p2 = Some(clean(1, 2, 2));
        let e = |g, s| Some((g, clean(1, s, s)));
        // (replies, answer (index or errno), holders, heal_parent); None: no parent anywhere
        let cases: Vec<(
            &str,
            Vec<LookupView>,
            Option<(std::result::Result<usize, i32>, Vec<usize>, bool)>,
        )> = vec![
            (
                "all agree",
                vec![lv(p1, e(7, 1), 0); 3],
                Some((Ok(0), vec![0, 1, 2], false)),
            ),
            (
                "a brick that missed the create is outvoted",
                vec![lv(p1, None, 2), lv(p2, e(7, 1), 0), lv(p2, e(7, 1), 0)],
                Some((Ok(1), vec![1, 2], true)),
            ),
            (
                "a brick that missed the delete is outvoted",
                vec![lv(p1, e(7, 1), 0), lv(p2, None, 2), lv(p2, None, 2)],
                Some((Err(2), vec![], true)),
            ),
            (
                "name replaced: the newer parent's gfid wins",
                vec![lv(p1, e(7, 1), 0), lv(p2, e(8, 1), 0), lv(p2, e(8, 1), 0)],
                Some((Ok(1), vec![1, 2], true)),
            ),
            (
                "newest entry copy among the voters",
                vec![lv(p2, e(7, 1), 0), lv(p2, e(7, 3), 0)],
                Some((Ok(1), vec![1], false)),
            ),
            (
                "brick without the parent",
                vec![lv(None, None, 2), lv(p1, e(7, 1), 0), lv(p1, e(7, 1), 0)],
                Some((Ok(1), vec![1, 2], true)),
            ),
            (
                "no brick has the parent",
                vec![lv(None, None, 2), lv(None, None, 2)],
                None,
            ),
            (
                "not found, errno 0 is EIO",
                vec![lv(p1, None, 0)],
                Some((Err(libc::EIO), vec![], false)),
            ),
            (
                "a dirty parent copy is outvoted by clean ones",
                vec![
                    lv(Some(dirty(1, 2, 2)), None, 2),
                    lv(p2, e(7, 1), 0),
                    lv(p2, e(7, 1), 0),
                ],
                Some((Ok(1), vec![1, 2], true)),
            ),
        ];
        for (name, replies, want) in cases {
            let got = lookup_vote(&replies).map(|v| (v.answer, v.holders, v.heal_parent));
            assert_eq!(got, want, "{name}");
        }
    }

    fn attr(c: Copy, mtime: i64, size: u64) -> pb::Attr {
        pb::Attr {
            kind: pb::Kind::File as i32,
            ver: pver(c.ver),
            pending: c.pending,
            mtime_ns: mtime,
            size,
            ..Default::default()
        }
    }

    #[test]
    fn heal_plan_table() {
        let ids = ["b0", "b1", "b2"];
        // (source policy, copies, Ok((source, sinks, new_version)) or Err)
        type Want = std::result::Result<(usize, Vec<usize>, bool), Error>;
        let cases: Vec<(&str, Source, Vec<pb::Attr>, Want)> = vec![
            (
                "in sync: no sinks",
                Source::Newest,
                vec![attr(clean(1, 1, 1), 5, 5); 3],
                Ok((0, vec![], false)),
            ),
            (
                "one stale copy",
                Source::Newest,
                vec![
                    attr(clean(1, 1, 1), 5, 5),
                    attr(clean(1, 2, 2), 6, 6),
                    attr(clean(1, 2, 2), 6, 6),
                ],
                Ok((1, vec![0], false)),
            ),
            (
                "a dirty copy heals from a clean one",
                Source::Newest,
                vec![
                    attr(dirty(1, 2, 2), 6, 6),
                    attr(clean(1, 2, 2), 6, 6),
                    attr(clean(1, 2, 2), 6, 6),
                ],
                Ok((1, vec![0], false)),
            ),
            (
                "all dirty: the first wins, all get a new version",
                Source::Newest,
                vec![
                    attr(dirty(1, 2, 2), 6, 1),
                    attr(dirty(1, 2, 2), 7, 9),
                    attr(dirty(1, 2, 2), 6, 1),
                ],
                Ok((0, vec![1, 2], true)),
            ),
            (
                "all present dirty, a brick away: wait for it",
                Source::Newest,
                vec![attr(dirty(1, 2, 2), 6, 1), attr(dirty(1, 2, 2), 7, 9)],
                Err(Error::NoGoodCopy),
            ),
            (
                "split brain stays for a person",
                Source::Newest,
                vec![attr(clean(1, 2, 2), 6, 6), attr(clean(1, 2, 3), 6, 6)],
                Err(Error::SplitBrain),
            ),
            (
                "settled by brick",
                Source::Brick("b1".into()),
                vec![attr(clean(1, 2, 2), 6, 6), attr(clean(1, 2, 3), 6, 6)],
                Ok((1, vec![0], true)),
            ),
            (
                "settled by mtime",
                Source::Mtime,
                vec![attr(clean(1, 2, 2), 9, 1), attr(clean(1, 2, 3), 6, 7)],
                Ok((0, vec![1], true)),
            ),
            (
                "settled by size",
                Source::Size,
                vec![attr(clean(1, 2, 2), 9, 1), attr(clean(1, 2, 3), 6, 7)],
                Ok((1, vec![0], true)),
            ),
            (
                "unknown brick",
                Source::Brick("b9".into()),
                vec![attr(clean(1, 2, 2), 6, 6)],
                Err(Error::Volfile(
                    "brick b9 has no copy of this file, or is not reachable".into(),
                )),
            ),
            (
                "same version, other attributes (a copy a heal just made)",
                Source::Newest,
                vec![attr(clean(1, 1, 1), 5, 5), attr(clean(1, 1, 1), 4, 5)],
                Ok((0, vec![1], false)),
            ),
        ];
        for (name, src, attrs, want) in cases {
            let refs: Vec<&pb::Attr> = attrs.iter().collect();
            // A volume of 3: the cases with fewer copies have a brick away.
            let all = attrs.len() == ids.len();
            let got = heal_plan(&src, &ids[..attrs.len()], &refs, all)
                .map(|p| (p.source, p.sinks, p.new_version));
            assert_eq!(got, want, "{name}");
        }
    }
}
