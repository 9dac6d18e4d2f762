//! Total decoding of bytes casfs reads back from disk or the network: the
//! one error type that says what is wrong with them (`Damage`), and a
//! bounds-checked reader of fixed-width fields (`Reader`).
//!
//! Every decoder in casfs (RocksDB keys and values in `store::meta` and
//! `store::ids`, tier records and listings in `shared`, RESP replies in
//! `shared::redis`, ccache entry headers in `integrity`) returns a value or
//! an error for *every* input: it never panics, never slices past the end,
//! and never turns missing bytes into zeros. `decode/fuzz.rs` feeds every
//! one of them truncated, mutated and random bytes to keep it so.
//!
//! Invariants:
//! - A decoder accepts what its encoder writes (and wrote in any format
//!   version still read); anything else is `Damage`, noticed where it is
//!   read rather than later as a wrong value.
//! - `Damage` says what is wrong with the bytes (which field, how many
//!   bytes); the caller, who knows which record it read, adds that and
//!   decides what the damage means (`Store::damaged` turns it into EIO,
//!   logged once per record with a pointer to `casfs fsck`).

use std::fmt;

/// What is wrong with one record's bytes (the caller names the record).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damage(String);

/// The result of decoding one record.
pub type Decoded<T> = std::result::Result<T, Damage>;

impl Damage {
    pub fn new(why: impl Into<String>) -> Damage {
        Damage(why.into())
    }
}

impl fmt::Display for Damage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Damage {}

/// Reads fields front to back. Every read checks the length first, so no
/// input makes it panic.
///
/// Invariant: `at <= bytes.len()`.
pub struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Reader<'a> {
        Reader { bytes, at: 0 }
    }

    fn left(&self) -> usize {
        self.bytes.len() - self.at
    }

    /// The next `n` bytes, which hold `field`.
    pub fn take(&mut self, n: usize, field: &str) -> Decoded<&'a [u8]> {
        if n > self.left() {
            return Err(Damage(format!(
                "truncated at byte {}: {field} needs {n} bytes, {} left",
                self.at,
                self.left()
            )));
        }
        let out = &self.bytes[self.at..self.at + n];
        self.at += n;
        Ok(out)
    }

    pub fn array<const N: usize>(&mut self, field: &str) -> Decoded<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, field)?);
        Ok(out)
    }

    pub fn u8(&mut self, field: &str) -> Decoded<u8> {
        Ok(self.array::<1>(field)?[0])
    }

    pub fn u16_le(&mut self, field: &str) -> Decoded<u16> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }

    pub fn u32_le(&mut self, field: &str) -> Decoded<u32> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }

    pub fn u64_le(&mut self, field: &str) -> Decoded<u64> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }

    /// The next byte, or None at the end (optional trailing fields).
    pub fn next_u8(&mut self) -> Option<u8> {
        self.u8("").ok()
    }

    /// Where the next field starts (for messages).
    pub fn at(&self) -> usize {
        self.at
    }

    /// Everything not read yet.
    pub fn rest(&mut self) -> &'a [u8] {
        let out = &self.bytes[self.at..];
        self.at = self.bytes.len();
        out
    }

    /// Checks that every byte was read (`what` is the record's last field).
    pub fn finish(&self, what: &str) -> Decoded<()> {
        match self.left() {
            0 => Ok(()),
            n => Err(Damage(format!(
                "{n} bytes after {what}, at byte {}: the record is longer than its format",
                self.at
            ))),
        }
    }
}

/// A value of exactly `N` bytes (fixed-width keys and values).
pub fn exact<const N: usize>(bytes: &[u8], what: &str) -> Decoded<[u8; N]> {
    <[u8; N]>::try_from(bytes).map_err(|_| Damage(format!("{} bytes, {what} has {N}", bytes.len())))
}

/// Bytes as printable text for messages, long ones shortened.
pub fn shown(bytes: &[u8]) -> String {
    const SHOWN_BYTES_MAX: usize = 80;
    let mut text = bytes[..bytes.len().min(SHOWN_BYTES_MAX)]
        .escape_ascii()
        .to_string();
    if bytes.len() > SHOWN_BYTES_MAX {
        text.push_str(&format!("... ({} bytes)", bytes.len()));
    }
    text
}

#[cfg(test)]
mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_refuses_short_input_and_says_where() {
        let mut r = Reader::new(&[1, 2, 3]);
        assert_eq!(r.u8("version"), Ok(1));
        let e = r.u32_le("uid").unwrap_err();
        assert!(e.to_string().contains("uid needs 4 bytes, 2 left"), "{e}");
        assert_eq!(r.u16_le("perm"), Ok(0x0302));
        assert_eq!(r.next_u8(), None);
        assert_eq!(r.finish("perm"), Ok(()));
        assert!(Reader::new(&[1]).finish("nothing").is_err());
        assert_eq!(exact::<2>(&[1, 2], "x"), Ok([1, 2]));
        assert!(exact::<8>(&[1, 2], "an inode number").is_err());
    }
}
