//! Applications' byte-range locks (POSIX and BSD), held on a majority of bricks.

use std::sync::Arc;

use futures::future::join_all;
use mortar_common::error::{Error, Result};
use mortar_common::gfid::Gfid;
use mortar_proto as pb;

use crate::conn::{self, Brick};
use crate::volume::Volume;

impl Volume {
    /// POSIX/BSD byte-range lock on a majority; blocking requests go brick by brick in
    /// volfile order so that two clients cannot deadlock.
    #[allow(clippy::too_many_arguments)]
    pub async fn lk(
        &self,
        g: Gfid,
        owner: u64,
        pid: u32,
        typ: i32,
        start: u64,
        end: u64,
        wait: bool,
        test: bool,
    ) -> Result<pb::LkReply> {
        let quorum = self.quorum();
        let bricks: Vec<Arc<Brick>> = self.bricks().into_iter().filter(|b| b.is_up()).collect();
        let req = |session: [u8; 16], typ: i32, wait: bool| pb::LkReq {
            session: session.to_vec(),
            gfid: g.to_vec(),
            owner,
            pid,
            typ,
            start,
            end,
            wait,
            test,
        };
        let send = |b: &Arc<Brick>, typ: i32, wait: bool| {
            let b = b.clone();
            async move {
                let f = move |mut c: mortar_proto::brick_client::BrickClient<_>, up: conn::Up| async move {
                    c.lk(req(up.session, typ, wait)).await
                };
                let r = if wait {
                    b.call_waiting(f).await
                } else {
                    b.call(f).await
                };
                (b, r.map(|(r, _)| r))
            }
        };
        if test || typ == libc::F_UNLCK {
            let rs = join_all(bricks.iter().map(|b| send(b, typ, false))).await;
            let mut ok = 0;
            for (_, r) in rs {
                if let Ok(r) = r {
                    Error::from_errno(r.errno)?;
                    if test && r.typ != libc::F_UNLCK {
                        return Ok(r);
                    }
                    ok += 1;
                }
            }
            if ok == 0 {
                return Err(Error::NoQuorum {
                    have: 0,
                    need: quorum,
                });
            }
            return Ok(pb::LkReply {
                typ: libc::F_UNLCK,
                ..Default::default()
            });
        }
        let mut granted = Vec::new();
        let mut refused = None;
        if wait {
            for b in &bricks {
                match send(b, typ, true).await {
                    (b, Ok(r)) if r.errno == 0 => granted.push(b),
                    (_, Ok(r)) => {
                        refused = Some(r.errno);
                        break;
                    }
                    (_, Err(_)) => {}
                }
            }
        } else {
            for (b, r) in join_all(bricks.iter().map(|b| send(b, typ, false))).await {
                match r {
                    Ok(r) if r.errno == 0 => granted.push(b),
                    Ok(r) => refused = Some(r.errno),
                    Err(_) => {}
                }
            }
        }
        if refused.is_none() && granted.len() >= quorum {
            return Ok(pb::LkReply::default());
        }
        // Undo the partial grant: only the range this request took is ours to drop.
        join_all(granted.iter().map(|b| send(b, libc::F_UNLCK, false))).await;
        match refused {
            Some(e) => Err(Error::Os(e)),
            None => Err(Error::NoQuorum {
                have: granted.len(),
                need: quorum,
            }),
        }
    }
}
