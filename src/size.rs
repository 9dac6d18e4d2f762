//! Sizes as ccache writes them (`max_size = 20G`, `ccache -M 500M`), so
//! that an operator can copy a value between ccache's configuration and
//! casfs's `--max-size` / `-o max_size=` and mean the same bytes.
//!
//! The rules are ccache's (its manual, "max_size": "Available suffixes: k,
//! M, G, T (decimal) and Ki, Mi, Gi, Ti (binary). The default suffix is G",
//! and `util::parse_size` in its sources), checked against ccache 4.7.5's
//! own `ccache -M`:
//! - a number, optionally with a fraction (`1.5`), then optional spaces and
//!   a unit: `k` or `K` (10^3), `M` (10^6), `G` (10^9), `T` (10^12); an
//!   `i` after the letter makes it binary (`Ki` 2^10 ... `Ti` 2^40); a
//!   trailing `B` is allowed (`20GB`, `20GiB`);
//! - no unit means G: `20` is 20 GB (ccache 4.7.5 reads a bare 20 as 20 GB;
//!   some later releases read it as 20 GiB: write the unit to be sure);
//! - the unit letters are case-sensitive as in ccache: `m`, `g`, `t` are
//!   refused rather than guessed (`m` could mean milli);
//! - `0` means no limit, as in ccache.
//!
//! Stricter than ccache, because a typo in a size silently changes what the
//! daemon evicts: text after the unit (`20Gx`), exponents (`1e3`), `inf`,
//! `nan`, signs, and a non-zero value below one byte are refused, with a
//! message naming what was given and what is accepted. Bytes are computed
//! exactly (integer arithmetic, truncated like ccache), never through a
//! float.

/// What every refusal ends with: how to write a size.
pub const SIZE_HELP: &str = "sizes are written as ccache writes them: 20G = 20 GB, \
20Gi = 20 GiB, 500M, 64Ki, 1.5T (k, M, G, T decimal; Ki, Mi, Gi, Ti binary); \
a bare number means G; 0 means no limit";

/// Most digits a size may have (integer and fraction together): enough for
/// any byte count, small enough that the arithmetic below cannot overflow
/// `u128` before the unit is applied.
const SIZE_DIGITS_MAX: usize = 30;

/// Parses a size limit. `Ok(None)` is ccache's `0`: no limit. The error
/// says why `text` is refused; the caller names the option it came from.
pub fn parse_size_limit(text: &str) -> Result<Option<u64>, String> {
    let refuse = |why: &str| Err(format!("{text:?} is refused: {why} ({SIZE_HELP})"));
    let t = text.trim();
    if t.is_empty() {
        return refuse("it is empty");
    }
    let number_len = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, rest) = t.split_at(number_len);
    if number.is_empty() {
        let lower = t.to_ascii_lowercase();
        return refuse(if t.starts_with('-') {
            "a size cannot be negative"
        } else if t.starts_with('+') {
            "write the number without a sign"
        } else if lower.starts_with("inf") || lower.starts_with("nan") {
            "a size must be a finite number (for no limit, write 0 or leave the option out)"
        } else {
            "it does not start with a number"
        });
    }
    let (int_digits, frac_digits) = match number.split_once('.') {
        Some((i, f)) => (i, f),
        None => (number, ""),
    };
    if frac_digits.contains('.') || (int_digits.is_empty() && frac_digits.is_empty()) {
        return refuse("it is not a number");
    }
    if int_digits.len() + frac_digits.len() > SIZE_DIGITS_MAX {
        return refuse("it has too many digits");
    }
    let unit = rest.trim_start();
    let multiplier: u128 = match unit_multiplier(unit) {
        Some(m) => m,
        None => {
            return refuse(&if unit.starts_with(['e', 'E']) {
                "exponents are not accepted; write the digits or use a unit".to_string()
            } else if unit.starts_with(['m', 'g', 't']) {
                format!("unit {unit:?} is not one (units are case-sensitive: M, G, T; k or K)")
            } else {
                format!("{unit:?} is not a unit")
            })
        }
    };
    // All digits, as one integer, and the power of ten the fraction divides by.
    let mut mantissa: u128 = 0;
    for c in int_digits.bytes().chain(frac_digits.bytes()) {
        mantissa = mantissa * 10 + u128::from(c - b'0');
    }
    if mantissa == 0 {
        return Ok(None);
    }
    let bytes = mantissa
        .checked_mul(multiplier)
        .map(|m| m / 10u128.pow(frac_digits.len() as u32));
    match bytes {
        Some(0) => refuse("it is less than one byte (for no limit, write 0)"),
        Some(b) if b <= u128::from(u64::MAX) => Ok(Some(b as u64)),
        _ => refuse("it is larger than 16 EiB"),
    }
}

/// The bytes one unit stands for, `None` if `unit` is not a unit.
fn unit_multiplier(unit: &str) -> Option<u128> {
    let unit = unit.strip_suffix('B').unwrap_or(unit);
    let mut chars = unit.chars();
    let power = match chars.next() {
        None => return Some(1_000_000_000),
        Some('k' | 'K') => 1,
        Some('M') => 2,
        Some('G') => 3,
        Some('T') => 4,
        Some(_) => return None,
    };
    let base: u128 = match chars.as_str() {
        "" => 1000,
        "i" => 1024,
        _ => return None,
    };
    Some(base.pow(power))
}

/// `bytes` for a log line: exact, and in the unit an operator wrote.
pub fn describe_bytes(bytes: u64) -> String {
    const UNITS: [(&str, u64); 8] = [
        ("Ti", 1 << 40),
        ("T", 1_000_000_000_000),
        ("Gi", 1 << 30),
        ("G", 1_000_000_000),
        ("Mi", 1 << 20),
        ("M", 1_000_000),
        ("Ki", 1 << 10),
        ("k", 1000),
    ];
    match UNITS
        .iter()
        .find(|(_, u)| bytes >= *u && bytes.is_multiple_of(*u))
    {
        Some((name, u)) => format!("{}{name} ({bytes} bytes)", bytes / u),
        None => format!("{bytes} bytes"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(text: &str) -> u64 {
        match parse_size_limit(text) {
            Ok(Some(b)) => b,
            other => panic!("{text:?} parsed as {other:?}"),
        }
    }

    fn refused(text: &str, why: &str) {
        match parse_size_limit(text) {
            Err(e) => {
                assert!(
                    e.contains(&format!("{text:?}")) && e.contains(why) && e.contains("20Gi"),
                    "the refusal of {text:?} must name it, say {why:?} and show an example: {e}"
                );
            }
            Ok(v) => panic!("{text:?} was accepted as {v:?}"),
        }
    }

    #[test]
    fn sizes_mean_what_they_mean_to_ccache() {
        // A bare number is G, decimal: ccache's `max_size = 20`.
        assert_eq!(bytes("20"), 20_000_000_000);
        assert_eq!(bytes("0.5"), 500_000_000);
        assert_eq!(bytes("20G"), 20_000_000_000);
        assert_eq!(bytes("20GB"), 20_000_000_000);
        assert_eq!(bytes("20 G"), 20_000_000_000);
        assert_eq!(bytes(" 20G "), 20_000_000_000);
        assert_eq!(bytes("20Gi"), 20 << 30);
        assert_eq!(bytes("20GiB"), 20 << 30);
        assert_eq!(bytes("500M"), 500_000_000);
        assert_eq!(bytes("500Mi"), 500 << 20);
        assert_eq!(bytes("64k"), 64_000);
        assert_eq!(bytes("64K"), 64_000);
        assert_eq!(bytes("64kB"), 64_000);
        assert_eq!(bytes("64Ki"), 64 << 10);
        assert_eq!(bytes("1T"), 1_000_000_000_000);
        assert_eq!(bytes("1Ti"), 1 << 40);
        assert_eq!(bytes("1.5Ki"), 1536);
        assert_eq!(bytes(".5k"), 500);
        assert_eq!(bytes("5."), 5_000_000_000);
        // Exact, truncated like ccache: never through a float.
        assert_eq!(bytes("0.001k"), 1);
        assert_eq!(bytes("1.0000000001G"), 1_000_000_000);
        assert_eq!(bytes("16777215Ti"), 16_777_215 << 40);
        // 0 is ccache's "no limit".
        assert_eq!(parse_size_limit("0").unwrap(), None);
        assert_eq!(parse_size_limit("0G").unwrap(), None);
        assert_eq!(parse_size_limit("0.0").unwrap(), None);
    }

    #[test]
    fn anything_else_is_refused_naming_it_with_an_example() {
        refused("", "empty");
        refused("inf", "finite");
        refused("INF", "finite");
        refused("nan", "finite");
        refused("1e30", "exponents");
        refused("1E3", "exponents");
        refused("-1", "negative");
        refused("-20G", "negative");
        refused("+20G", "sign");
        refused("lots", "does not start with a number");
        refused("20Gx", "not a unit");
        refused("20Gib", "not a unit");
        refused("20m", "case-sensitive");
        refused("20g", "case-sensitive");
        refused("1t", "case-sensitive");
        refused("20P", "not a unit");
        refused("20 bytes", "not a unit");
        refused("1.2.3", "not a number");
        refused(".", "not a number");
        refused("0.0000000001", "less than one byte");
        refused("0.0001k", "less than one byte");
        refused("16777216Ti", "16 EiB");
        refused("99999999999999999999T", "16 EiB");
        refused("1234567890123456789012345678901", "too many digits");
    }

    #[test]
    fn bytes_are_described_in_the_unit_they_were_written_in() {
        assert_eq!(describe_bytes(20 << 30), "20Gi (21474836480 bytes)");
        assert_eq!(describe_bytes(20_000_000_000), "20G (20000000000 bytes)");
        assert_eq!(describe_bytes(1536), "1536 bytes");
        assert_eq!(describe_bytes(64_000), "64k (64000 bytes)");
        assert_eq!(describe_bytes(999), "999 bytes");
    }
}
