//! The RESP2 codec: replies read within bounds (pure: any `BufRead`).

#[allow(unused_imports)]
use super::*;

/// One RESP2 reply.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Reply {
    Status(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

pub(super) fn bad_reply(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why)
}

/// The bounds one reply is read under.
pub(super) struct ReplyBounds {
    /// Bound on each bulk string.
    pub(super) value_bytes_max: u64,
    /// Bound on the whole reply, framing included.
    pub(super) limit_bytes: u64,
    /// What is left of `limit_bytes`.
    pub(super) left_bytes: u64,
}

impl ReplyBounds {
    pub(super) fn charge(&mut self, bytes: u64) -> io::Result<()> {
        match self.left_bytes.checked_sub(bytes) {
            Some(left) => {
                self.left_bytes = left;
                Ok(())
            }
            None => Err(bad_reply(format!(
                "a reply over the {} bytes allowed",
                self.limit_bytes
            ))),
        }
    }
}

/// Reads one reply whose bulk strings hold at most `value_bytes_max` bytes
/// (and which is at most that plus its framing, within
/// `REDIS_REPLY_BYTES_MAX`).
pub(crate) fn read_reply<R: BufRead>(r: &mut R, value_bytes_max: u64) -> io::Result<Reply> {
    let limit_bytes = value_bytes_max
        .saturating_add(REDIS_REPLY_FRAMING_BYTES)
        .min(REDIS_REPLY_BYTES_MAX);
    let mut bounds = ReplyBounds {
        value_bytes_max,
        limit_bytes,
        left_bytes: limit_bytes,
    };
    read_value(r, &mut bounds, 0)
}

pub(super) fn read_value<R: BufRead>(
    r: &mut R,
    bounds: &mut ReplyBounds,
    depth: usize,
) -> io::Result<Reply> {
    let line = read_line(r)?;
    bounds.charge(line.len() as u64 + 2)?;
    let Some((&kind, rest)) = line.split_first() else {
        return Err(bad_reply("an empty reply line".into()));
    };
    let text = || String::from_utf8_lossy(rest).into_owned();
    match kind {
        b'+' => Ok(Reply::Status(text())),
        b'-' => Ok(Reply::Error(text())),
        b':' => Ok(Reply::Int(parse_int(rest)?)),
        b'$' => {
            let len = parse_int(rest)?;
            if len == -1 {
                return Ok(Reply::Bulk(None));
            }
            let len = u64::try_from(len).map_err(|_| bad_reply(format!("bulk length {len}")))?;
            if len > bounds.value_bytes_max {
                // About one value, not the stream: `TierError::Data`.
                return Err(io::Error::new(
                    io::ErrorKind::FileTooLarge,
                    format!(
                        "a value of {len} bytes, over the {} allowed",
                        bounds.value_bytes_max
                    ),
                ));
            }
            bounds.charge(len.saturating_add(2))?;
            // Grown as bytes arrive, not trusted up front.
            let mut bytes = Vec::with_capacity(len.min(REDIS_READ_BUFFER_BYTES as u64) as usize);
            r.by_ref().take(len).read_to_end(&mut bytes)?;
            if (bytes.len() as u64) < len {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let mut crlf = [0u8; 2];
            r.read_exact(&mut crlf)?;
            if &crlf != b"\r\n" {
                return Err(bad_reply("a bulk string not ended by CRLF".into()));
            }
            Ok(Reply::Bulk(Some(bytes)))
        }
        b'*' => {
            let len = parse_int(rest)?;
            if len == -1 {
                return Ok(Reply::Array(None));
            }
            let len = usize::try_from(len).map_err(|_| bad_reply(format!("array length {len}")))?;
            if len > REDIS_ARRAY_LEN_MAX || depth >= REDIS_ARRAY_DEPTH_MAX {
                return Err(bad_reply(format!(
                    "an array of {len} at depth {depth}: over our bounds"
                )));
            }
            let mut items = Vec::with_capacity(len);
            for _ in 0..len {
                items.push(read_value(r, bounds, depth + 1)?);
            }
            Ok(Reply::Array(Some(items)))
        }
        other => Err(bad_reply(format!(
            "a reply starting with {:?}",
            other as char
        ))),
    }
}

/// What a streamed `GET` found.
pub(super) enum Bulk {
    Missing,
    /// This many bytes were copied to the sink.
    Copied(u64),
    /// An error reply, as the server said it.
    Error(String),
}

/// Reads the reply to a `GET`: a bulk string of at most `max` bytes is
/// copied to `sink` as it arrives (a value over `max` is `FileTooLarge`,
/// refused before any of it is read: the connection is then dropped).
pub(super) fn read_bulk_into<R: BufRead>(
    r: &mut R,
    max: u64,
    sink: &mut dyn Write,
    progress: &crate::shared::Progress,
) -> io::Result<Bulk> {
    let line = read_line(r)?;
    match line.split_first() {
        Some((b'-', rest)) => Ok(Bulk::Error(String::from_utf8_lossy(rest).into_owned())),
        Some((b'$', rest)) => {
            let len = parse_int(rest)?;
            if len == -1 {
                return Ok(Bulk::Missing);
            }
            let len = u64::try_from(len).map_err(|_| bad_reply(format!("bulk length {len}")))?;
            if len > max {
                return Err(io::Error::new(
                    io::ErrorKind::FileTooLarge,
                    format!("a value of {len} bytes, over the {max} allowed"),
                ));
            }
            crate::shared::copy_counted(r, sink, len, progress)?;
            let mut crlf = [0u8; 2];
            r.read_exact(&mut crlf)?;
            if &crlf != b"\r\n" {
                return Err(bad_reply("a bulk string not ended by CRLF".into()));
            }
            Ok(Bulk::Copied(len))
        }
        _ => Err(bad_reply(format!(
            "a GET answered {:?}",
            String::from_utf8_lossy(&line[..line.len().min(40)])
        ))),
    }
}

/// One CRLF-ended line, without its CRLF.
pub(super) fn read_line<R: BufRead>(r: &mut R) -> io::Result<Vec<u8>> {
    let mut line = Vec::new();
    r.by_ref()
        .take(REDIS_LINE_BYTES_MAX as u64 + 2)
        .read_until(b'\n', &mut line)?;
    if line.ends_with(b"\r\n") {
        line.truncate(line.len() - 2);
        return Ok(line);
    }
    if line.len() >= REDIS_LINE_BYTES_MAX + 2 {
        return Err(bad_reply(format!(
            "a reply line over {REDIS_LINE_BYTES_MAX} bytes"
        )));
    }
    if line.last() == Some(&b'\n') {
        return Err(bad_reply("a reply line ended by LF alone".into()));
    }
    Err(io::ErrorKind::UnexpectedEof.into())
}

pub(super) fn parse_int(digits: &[u8]) -> io::Result<i64> {
    std::str::from_utf8(digits)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            bad_reply(format!(
                "{:?} is not an integer",
                digits.escape_ascii().to_string()
            ))
        })
}
