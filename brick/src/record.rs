//! Mortar's per-inode record, kept in one extended attribute of the backend inode so that a
//! lookup costs a single getxattr.

use mortar_common::gfid::Gfid;

pub const XATTR: &str = "trusted.mortar.rec";
const FORMAT: u8 = 3;
const LEN: usize = 1 + 16 + 8 * 6;
/// Format 2 (before `pending`): read as a record with nothing pending.
const FORMAT_2: u8 = 2;
const LEN_2: usize = 1 + 16 + 8 * 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub gfid: Gfid,
    /// Highest lock term granted on this inode: changes made under a lower term are refused.
    pub promised: u64,
    /// Version of the content: (term, seq, change id).
    pub ver: (u64, u64, u64),
    /// Change time stamped by the client, so that every copy reports the same ctime.
    pub ctime_ns: i64,
    /// The id of a change begun on this copy and not finished (0: none). Written before the
    /// change is applied and cleared with the new version, so that a brick that dies in
    /// the middle leaves evidence: its copy is no longer taken to be at `ver`.
    pub pending: u64,
}

impl Record {
    pub fn new(gfid: Gfid, promised: u64, ctime_ns: i64) -> Record {
        Record {
            gfid,
            promised,
            ver: (0, 0, 0),
            ctime_ns,
            pending: 0,
        }
    }

    pub fn encode(&self) -> [u8; LEN] {
        let mut b = [0u8; LEN];
        b[0] = FORMAT;
        b[1..17].copy_from_slice(&self.gfid.0);
        b[17..25].copy_from_slice(&self.promised.to_le_bytes());
        b[25..33].copy_from_slice(&self.ver.0.to_le_bytes());
        b[33..41].copy_from_slice(&self.ver.1.to_le_bytes());
        b[41..49].copy_from_slice(&self.ver.2.to_le_bytes());
        b[49..57].copy_from_slice(&self.ctime_ns.to_le_bytes());
        b[57..65].copy_from_slice(&self.pending.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Option<Record> {
        match (b.len(), b.first()) {
            (LEN, Some(&FORMAT)) | (LEN_2, Some(&FORMAT_2)) => {}
            _ => return None,
        }
        let u = |r: std::ops::Range<usize>| u64::from_le_bytes(b[r].try_into().unwrap());
        Some(Record {
            gfid: Gfid::from_bytes(&b[1..17])?,
            promised: u(17..25),
            ver: (u(25..33), u(33..41), u(41..49)),
            ctime_ns: u(49..57) as i64,
            pending: if b.len() == LEN { u(57..65) } else { 0 },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let r = Record {
            gfid: Gfid::random(),
            promised: 7,
            ver: (5, 9, 11),
            ctime_ns: -3,
            pending: 4,
        };
        assert_eq!(Record::decode(&r.encode()), Some(r));
        // A record written before `pending` existed reads as one with nothing pending.
        let old = &r.encode()[..LEN_2];
        let mut old = old.to_vec();
        old[0] = FORMAT_2;
        assert_eq!(Record::decode(&old), Some(Record { pending: 0, ..r }));
        assert_eq!(Record::decode(&[0u8; 3]), None);
    }
}
