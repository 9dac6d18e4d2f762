//! Listing file names: a name escaped into a file name and back (pure, total).

#[allow(unused_imports)]
use super::*;

/// A listing file's name for `name`: `f.` or `d.` and the escaped name.
pub(super) fn list_entry_name(name: &[u8], dir: bool) -> Option<String> {
    let mut out = String::from(if dir { "d." } else { "f." });
    for &c in name {
        if c.is_ascii_alphanumeric() || b"._-".contains(&c) {
            out.push(c as char);
        } else {
            out.push_str(&format!("%{c:02X}"));
        }
    }
    (out.len() <= LIST_NAME_BYTES_MAX + 2).then_some(out)
}

/// The name a listing file's name stands for (total: None for anything
/// `list_entry_name` does not write).
pub(crate) fn parse_list_entry(file: &[u8]) -> Option<Listed> {
    let (dir, rest) = match file {
        [b'd', b'.', rest @ ..] => (true, rest),
        [b'f', b'.', rest @ ..] => (false, rest),
        _ => return None,
    };
    let mut name = Vec::with_capacity(rest.len());
    let mut i = 0;
    while i < rest.len() {
        if rest[i] == b'%' {
            // Two hex digits (from_str_radix alone would take "+f").
            let hex = rest
                .get(i + 1..i + 3)
                .filter(|h| h.iter().all(u8::is_ascii_hexdigit))?;
            name.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
            i += 3;
        } else {
            name.push(rest[i]);
            i += 1;
        }
    }
    (!name.is_empty()).then_some(Listed { name, dir })
}
