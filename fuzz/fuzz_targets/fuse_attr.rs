//! The mount's edge: a brick's `Attr` (as decoded from the wire) becomes the kernel's
//! attributes only when it is well formed; never silently a different inode.
#![no_main]

use fuser::FileType;
use libfuzzer_sys::fuzz_target;
use mortar_client::fuse::fuzzing::file_attr;
use mortar_common::gfid::Gfid;
use mortar_proto as pb;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    // Whatever a brick (or something posing as one) sends: first as protobuf wire bytes.
    let Ok(a) = pb::Attr::decode(data) else {
        return;
    };
    match file_attr(&a) {
        Ok((g, fa)) => {
            assert_eq!(
                a.gfid.len(),
                16,
                "accepted a gfid of {} bytes",
                a.gfid.len()
            );
            assert_eq!(g.0.as_slice(), a.gfid.as_slice());
            assert_eq!(fa.ino.0, g.ino(), "inode number is not the gfid's");
            assert!(
                fa.ino.0 != 1 || g == Gfid::ROOT,
                "root's inode for another gfid"
            );
            assert!(fa.ino.0 != 0, "inode number 0");
            let want = match pb::Kind::try_from(a.kind) {
                Ok(pb::Kind::Dir) => FileType::Directory,
                Ok(pb::Kind::Symlink) => FileType::Symlink,
                Ok(pb::Kind::Fifo) => FileType::NamedPipe,
                Ok(pb::Kind::Socket) => FileType::Socket,
                Ok(pb::Kind::Char) => FileType::CharDevice,
                Ok(pb::Kind::Block) => FileType::BlockDevice,
                Ok(pb::Kind::File) => FileType::RegularFile,
                Ok(pb::Kind::Unknown) | Err(_) => panic!("accepted kind {}", a.kind),
            };
            assert_eq!(fa.kind, want);
            assert!(fa.perm <= 0o7777);
            assert_eq!(
                (fa.size, fa.nlink, fa.uid, fa.gid),
                (a.size, a.nlink, a.uid, a.gid)
            );
        }
        Err(_) => {
            let bad_gfid = a.gfid.len() != 16;
            let bad_kind = !matches!(pb::Kind::try_from(a.kind), Ok(k) if k != pb::Kind::Unknown);
            let g = Gfid::from_bytes(&a.gfid);
            let bad_ino = g.is_some_and(|g| (g.ino() == 1) != (g == Gfid::ROOT) || g.ino() == 0);
            assert!(
                bad_gfid || bad_kind || bad_ino,
                "refused a good attr: {a:?}"
            );
        }
    }
});
