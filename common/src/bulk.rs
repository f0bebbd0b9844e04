//! The bulk-read protocol: how a healing brick copies file data from another brick of a
//! plain-TCP cluster without gRPC's copies.
//!
//! A self-heal copies whole files. Through the `Read` RPC every byte is copied five times
//! on the way (the source's page cache into a buffer, into the HTTP/2 frame, the socket;
//! the sink's socket into a frame, into the message, into its page cache), and on a
//! 2-CPU machine those copies, not the disk, bound the heal. On this protocol the source
//! sends the file with `sendfile(2)` and the sink moves the bytes from the socket into the
//! file with `splice(2)`: one copy, into the sink's page cache.
//!
//! It shares the brick's port: a connection that starts with [`MAGIC`] is a bulk one,
//! anything else is gRPC. It is served only by bricks without TLS (there is no kernel TLS
//! here to encrypt a `sendfile`), and reads only what the `Read` RPC would give the same
//! peer: file data by gfid.
//!
//! After the magic, the client sends requests one at a time, each [`REQUEST`] bytes:
//! gfid (16), offset (u64), length (u32), big-endian. The answer is [`REPLY`] bytes: errno
//! (i32, 0 on success) and the count `n` of bytes that follow (u32; fewer than asked only
//! at the end of the file), then the `n` bytes. A source that cannot send all `n` (the file
//! shrank meanwhile) closes the connection.

/// First bytes of a bulk connection (an HTTP/2 connection starts with `PRI `, a TLS one
/// with the byte 0x16).
pub const MAGIC: &[u8; 8] = b"MORTBLK1";

/// Bytes of one request: gfid, offset, length.
pub const REQUEST: usize = 28;

/// Bytes of a reply's header: errno, count.
pub const REPLY: usize = 8;

/// Largest length a request may ask for.
pub const MAX_LEN: u32 = 4 << 20;

/// One read: `len` bytes of the file `gfid` from `offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub gfid: [u8; 16],
    pub offset: u64,
    pub len: u32,
}

impl Request {
    pub fn encode(&self) -> [u8; REQUEST] {
        let mut b = [0u8; REQUEST];
        b[..16].copy_from_slice(&self.gfid);
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..].copy_from_slice(&self.len.to_be_bytes());
        b
    }

    /// A request as sent; `Err(errno)` for a length the protocol does not allow.
    pub fn decode(b: &[u8; REQUEST]) -> Result<Request, i32> {
        let r = Request {
            gfid: b[..16].try_into().unwrap(),
            offset: u64::from_be_bytes(b[16..24].try_into().unwrap()),
            len: u32::from_be_bytes(b[24..].try_into().unwrap()),
        };
        if r.len == 0 || r.len > MAX_LEN || r.offset.checked_add(r.len as u64).is_none() {
            return Err(libc::EINVAL);
        }
        Ok(r)
    }
}

pub fn encode_reply(errno: i32, n: u32) -> [u8; REPLY] {
    let mut b = [0u8; REPLY];
    b[..4].copy_from_slice(&errno.to_be_bytes());
    b[4..].copy_from_slice(&n.to_be_bytes());
    b
}

/// `(errno, n)` of a reply header; `n` beyond what was asked is refused.
pub fn decode_reply(b: &[u8; REPLY], asked: u32) -> Result<(i32, u32), &'static str> {
    let errno = i32::from_be_bytes(b[..4].try_into().unwrap());
    let n = u32::from_be_bytes(b[4..].try_into().unwrap());
    match errno {
        0 if n <= asked => Ok((0, n)),
        0 => Err("more bytes than asked for"),
        e if e > 0 && n == 0 => Ok((e, 0)),
        _ => Err("malformed reply"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_replies_round_trip_and_bad_ones_are_refused() {
        let r = Request {
            gfid: [7; 16],
            offset: 1 << 40,
            len: 1 << 20,
        };
        assert_eq!(Request::decode(&r.encode()), Ok(r));
        for bad in [
            Request { len: 0, ..r },
            Request {
                len: MAX_LEN + 1,
                ..r
            },
            Request {
                offset: u64::MAX - 10,
                ..r
            },
        ] {
            assert_eq!(Request::decode(&bad.encode()), Err(libc::EINVAL), "{bad:?}");
        }
        assert_eq!(decode_reply(&encode_reply(0, 10), 10), Ok((0, 10)));
        assert_eq!(
            decode_reply(&encode_reply(libc::ENOENT, 0), 10),
            Ok((libc::ENOENT, 0))
        );
        assert!(decode_reply(&encode_reply(0, 11), 10).is_err());
        assert!(decode_reply(&encode_reply(-5, 0), 10).is_err());
        assert!(decode_reply(&encode_reply(libc::EIO, 3), 10).is_err());
    }
}
