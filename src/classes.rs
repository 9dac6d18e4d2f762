//! File classes: which names are create-only results, which are shared but
//! replaceable, which are host-local scratch. One table of path rules decides.
//!
//! A rule is `PATTERN=CLASS`. The pattern is matched against the *end* of
//! the file's path below the mount root, one `/`-separated component at a
//! time, so `tmp/**` matches `tmp/x` and `a/b/tmp/x/y`, and `stats` matches
//! any file named `stats`; a pattern starting with `/` is anchored at the
//! root. In a component, `*` matches any run of characters, `?` one
//! character, `[a-z0-9]` one character of a set; a set may be followed by a
//! count: `+` (one or more), `{n}`, `{n,}` or `{n,m}`. `**` matches any
//! number of components. Rules given on the command line come before the
//! built-in ones; the first match wins.
//!
//! The built-in rules describe every ccache generation's layout (2.x/3.x,
//! 4.0–4.12, ≥ 4.13): see `DEFAULT_RULES`. Rules that would match ordinary
//! names (plain hex, `<hex>-<size>`) require ccache's one-hex-digit level
//! directories above them, so a file called `cafe.c`, `add.a` or `bad`
//! outside a ccache layout is an ordinary (mutable) file.
//!
//! Invariant: the class of a name is a pure function of its path and, for
//! `ccache-entry`, of the first bytes of the content published under it.

use std::fmt;

/// What a name's class decides: binding rule and where the bytes live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// Create-only, content-addressed, shareable: a rename or link onto an
    /// existing result keeps the first content.
    Result,
    /// Content-addressed, shareable, replaced atomically (last writer wins).
    Mutable,
    /// Host-local plain file with POSIX semantics: no hashing, no sharing.
    Local,
    /// ccache ≥ 4.13 entry: the header decides Result or Mutable at
    /// publication (magic 0xccac, format version, type 0 = result,
    /// 1 = manifest); anything else is Mutable.
    CcacheEntry,
}

impl Class {
    pub fn parse(s: &str) -> Option<Class> {
        match s {
            "result" => Some(Class::Result),
            "mutable" => Some(Class::Mutable),
            "local" => Some(Class::Local),
            "ccache-entry" => Some(Class::CcacheEntry),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Class::Result => "result",
            Class::Mutable => "mutable",
            Class::Local => "local",
            Class::CcacheEntry => "ccache-entry",
        }
    }

    /// Stable on-disk code (stored in inode records; never renumber).
    pub fn code(self) -> u8 {
        match self {
            Class::Result => 1,
            Class::Mutable => 2,
            Class::Local => 3,
            Class::CcacheEntry => 4,
        }
    }

    pub fn from_code(c: u8) -> Option<Class> {
        match c {
            1 => Some(Class::Result),
            2 => Some(Class::Mutable),
            3 => Some(Class::Local),
            4 => Some(Class::CcacheEntry),
            _ => None,
        }
    }

    /// Whether published bytes are content-addressed blobs.
    pub fn is_blob(self) -> bool {
        self != Class::Local
    }

    /// Resolves `CcacheEntry` from the first bytes of the content.
    pub fn resolve(self, head: &[u8]) -> Class {
        match self {
            Class::CcacheEntry => match head {
                [0xcc, 0xac, _version, 0, ..] => Class::Result,
                _ => Class::Mutable,
            },
            other => other,
        }
    }
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The built-in rules, one group per ccache generation, written from each
/// version's sources (the file operations are replayed in
/// `tests/mount_layouts.rs`). Documented in doc/semantics.md; keep the two in step.
pub const DEFAULT_RULES: &[&str] = &[
    // Host-local scratch, every generation: ccache's temporary directory and
    // lock directory, `symlink()` locks and their `.alive` companions,
    // counters and configuration rewritten in place.
    "tmp/**=local",
    "lock/**=local",
    "*.lock=local",
    "*.alive=local",
    "stats=local",
    "ccache.conf=local",
    "CACHEDIR.TAG=local",
    // Temporary files. ccache's own test for one is "contains `.tmp.`":
    // 3.x `<dest>.tmp.<host>.<pid>.XXXXXX` (stdout, stderr, manifests,
    // stats), 4.0–4.6 `<dest>.tmp.XXXXXX`, ≥ 4.7 `<dest>.tmp.XXXXXX.tmp`,
    // and the NFS-safe removals `.ccache.rm.tmp` (≤ 4.6),
    // `.ccache.tmp.unlink` (4.7–4.12), `.ccache.tmp.remove` (≥ 4.13).
    "*.tmp=local",
    "*.tmp.*=local",
    // ccache 2.x keeps its temporaries in the cache root itself
    // (`tmp.stdout.<host>.<pid>`, `tmp.hash.<host>.<pid>.o`, ...).
    "tmp.*.*.*=local",
    // ccache 2.x and 3.x: `<md4 hex>-<size>` below 1–8 one-hex-digit level
    // directories: the object (2.x, no suffix; 3.x `.o`) and its companions
    // are results, `.manifest` is a manifest, and anything else of that
    // shape is a 3.x copy temporary `<dest>.<host>.<pid>.XXXXXX`.
    "[0-9a-f]/[0-9a-f]{24,}-[0-9]+=result",
    "[0-9a-f]/[0-9a-f]{24,}-[0-9]+.o=result",
    "[0-9a-f]/[0-9a-f]{24,}-[0-9]+.stderr=result",
    "[0-9a-f]/[0-9a-f]{24,}-[0-9]+.d=result",
    "[0-9a-f]/[0-9a-f]{24,}-[0-9]+.gcno=result",
    "[0-9a-f]/[0-9a-f]{24,}-[0-9]+.su=result",
    "[0-9a-f]/[0-9a-f]{24,}-[0-9]+.dia=result",
    "[0-9a-f]/[0-9a-f]{24,}-[0-9]+.dwo=result",
    "[0-9a-f]/[0-9a-f]{24,}-[0-9]+.manifest=mutable",
    "[0-9a-f]/[0-9a-f]{24,}-[0-9]+.*=local",
    // ccache 4.0–4.12: base32hex names (29–31 characters below 2–4 levels)
    // with an upper-case suffix: `R` result, `<n>W` raw file, `M` manifest.
    // The upper-case suffix is distinctive enough that these apply at any
    // depth (as they always have).
    "[0-9a-v][0-9a-v]*R=result",
    "[0-9a-v][0-9a-v]*W=result",
    "[0-9a-v][0-9a-v]*M=mutable",
    // ccache ≥ 4.13: plain hex (36–38 digits below 2–4 levels), the header
    // tells a result from a manifest; raw files are `<hex>_<nn>`.
    "[0-9a-f]/[0-9a-f]/[0-9a-f]{32,}=ccache-entry",
    "[0-9a-f]/[0-9a-f]/[0-9a-f]{32,}_[0-9a-f]{2}=result",
    "**=mutable",
];

#[derive(Clone, Debug)]
struct Rule {
    anchored: bool,
    parts: Vec<String>,
    class: Class,
}

/// The ordered rule table.
#[derive(Clone, Debug)]
pub struct Rules {
    rules: Vec<Rule>,
}

impl Rules {
    /// `overrides` (from the command line) first, then the defaults.
    pub fn new(overrides: &[String]) -> Result<Rules, String> {
        let mut rules = Vec::new();
        for text in overrides
            .iter()
            .map(String::as_str)
            .chain(DEFAULT_RULES.iter().copied())
        {
            rules.push(parse_rule(text)?);
        }
        Ok(Rules { rules })
    }

    /// The class of a file at `path` (components below the mount root).
    pub fn classify(&self, path: &[&[u8]]) -> Class {
        for rule in &self.rules {
            if rule_matches(rule, path) {
                return rule.class;
            }
        }
        Class::Mutable
    }
}

fn parse_rule(text: &str) -> Result<Rule, String> {
    let (pattern, class) = text
        .rsplit_once('=')
        .ok_or_else(|| format!("class rule {text:?} is not PATTERN=CLASS"))?;
    let class = Class::parse(class).ok_or_else(|| {
        format!("class rule {text:?}: unknown class {class:?} (use result, mutable, local or ccache-entry)")
    })?;
    if pattern.is_empty() {
        return Err(format!("class rule {text:?} has an empty pattern"));
    }
    let anchored = pattern.starts_with('/');
    let parts = pattern
        .trim_start_matches('/')
        .split('/')
        .map(str::to_owned)
        .collect();
    Ok(Rule {
        anchored,
        parts,
        class,
    })
}

fn rule_matches(rule: &Rule, path: &[&[u8]]) -> bool {
    let parts: Vec<&[u8]> = rule.parts.iter().map(|p| p.as_bytes()).collect();
    if rule.anchored {
        return match_parts(&parts, path);
    }
    (0..path.len()).any(|start| match_parts(&parts, &path[start..]))
}

/// Matches pattern components against path components, `**` spanning any
/// number of components (but a trailing `**` at least one).
fn match_parts(parts: &[&[u8]], path: &[&[u8]]) -> bool {
    match parts.split_first() {
        None => path.is_empty(),
        Some((&b"**", rest)) => {
            let min = if rest.is_empty() { 1 } else { 0 };
            (min..=path.len()).any(|skip| match_parts(rest, &path[skip..]))
        }
        Some((part, rest)) => match path.split_first() {
            Some((name, tail)) => glob(part, name) && match_parts(rest, tail),
            None => false,
        },
    }
}

/// One-component glob: `*`, `?`, `[set]` with ranges and an optional count.
fn glob(pat: &[u8], name: &[u8]) -> bool {
    match pat.split_first() {
        None => name.is_empty(),
        Some((b'*', rest)) => (0..=name.len()).any(|i| glob(rest, &name[i..])),
        Some((b'?', rest)) => !name.is_empty() && glob(rest, &name[1..]),
        Some((b'[', rest)) => {
            let Some(close) = rest.iter().position(|&c| c == b']') else {
                return name.first() == Some(&b'[') && glob(rest, &name[1..]);
            };
            let set = &rest[..close];
            let (min, max, tail) = count_after_set(&rest[close + 1..]);
            let run = name
                .iter()
                .take(max)
                .take_while(|&&c| in_set(set, c))
                .count();
            run >= min && (min..=run).rev().any(|n| glob(tail, &name[n..]))
        }
        Some((&p, rest)) => name.first() == Some(&p) && glob(rest, &name[1..]),
    }
}

/// The count after a set (`+`, `{n}`, `{n,}`, `{n,m}`) as (min, max, rest of
/// the pattern); without one (or with a malformed one, which then stays
/// literal text) a set matches exactly one character.
fn count_after_set(pat: &[u8]) -> (usize, usize, &[u8]) {
    let once = (1, 1, pat);
    match pat.split_first() {
        Some((b'+', rest)) => (1, usize::MAX, rest),
        Some((b'{', rest)) => {
            let Some(end) = rest.iter().position(|&c| c == b'}') else {
                return once;
            };
            let Ok(inner) = std::str::from_utf8(&rest[..end]) else {
                return once;
            };
            let bounds = match inner.split_once(',') {
                None => inner.parse().ok().map(|n| (n, n)),
                Some((lo, "")) => lo.parse().ok().map(|n| (n, usize::MAX)),
                Some((lo, hi)) => lo.parse().ok().zip(hi.parse().ok()),
            };
            match bounds {
                Some((lo, hi)) if lo <= hi => (lo, hi, &rest[end + 1..]),
                _ => once,
            }
        }
        _ => once,
    }
}

fn in_set(set: &[u8], c: u8) -> bool {
    let mut i = 0;
    while i < set.len() {
        if i + 2 < set.len() && set[i + 1] == b'-' {
            if set[i] <= c && c <= set[i + 2] {
                return true;
            }
            i += 3;
        } else {
            if set[i] == c {
                return true;
            }
            i += 1;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class_of(rules: &Rules, path: &str) -> Class {
        let parts: Vec<&[u8]> = path.split('/').map(str::as_bytes).collect();
        rules.classify(&parts)
    }

    #[test]
    fn ccache_4_7_layout_at_root_and_below() {
        let r = Rules::new(&[]).unwrap();
        for prefix in ["", "ccache/", "a/b/c/"] {
            let p = |s: &str| format!("{prefix}{s}");
            assert_eq!(
                class_of(&r, &p("a/e/c8aiq5frsd7ctaaepqbvl8shkb4kcjcR")),
                Class::Result
            );
            assert_eq!(
                class_of(&r, &p("4/d/7akuu12pqg5l3n8scba4tpo4qcidrbgM")),
                Class::Mutable
            );
            assert_eq!(
                class_of(&r, &p("4/d/7akuu12pqg5l3n8scba4tpo4qcidrbgW")),
                Class::Result
            );
            assert_eq!(
                class_of(
                    &r,
                    &p("a/e/c8aiq5frsd7ctaaepqbvl8shkb4kcjcR.tmp.CL3Rln.tmp")
                ),
                Class::Local
            );
            assert_eq!(class_of(&r, &p("4/stats")), Class::Local);
            assert_eq!(class_of(&r, &p("4/stats.lock")), Class::Local);
            assert_eq!(
                class_of(&r, &p("tmp/cpp_stdout.tmp.UbSPh1.i")),
                Class::Local
            );
            assert_eq!(class_of(&r, &p("tmp/.cleaned")), Class::Local);
            assert_eq!(class_of(&r, &p("ccache.conf")), Class::Local);
            assert_eq!(class_of(&r, &p("a/CACHEDIR.TAG")), Class::Local);
            assert_eq!(class_of(&r, &p("lock/subdir_a.alive")), Class::Local);
        }
    }

    /// A 4.13 key is 40 hex digits; the first 2–4 name the level directories.
    const HEX38: &str = "cdef0123456789abcdef0123456789abcdef01";

    #[test]
    fn ccache_4_13_hex_names_are_decided_by_header() {
        let r = Rules::new(&[]).unwrap();
        for prefix in ["", "cc/", "a/b/c/"] {
            let p = |s: &str| format!("{prefix}{s}");
            let c = class_of(&r, &p(&format!("a/b/{HEX38}")));
            assert_eq!(c, Class::CcacheEntry);
            assert_eq!(c.resolve(&[0xcc, 0xac, 1, 0, 9]), Class::Result);
            assert_eq!(c.resolve(&[0xcc, 0xac, 1, 1, 9]), Class::Mutable);
            assert_eq!(c.resolve(b"garbage"), Class::Mutable);
            // Four levels (37 digits after `move_to_wanted_cache_level`).
            assert_eq!(
                class_of(&r, &p(&format!("a/b/c/d/{}", &HEX38[2..]))),
                Class::CcacheEntry
            );
            assert_eq!(class_of(&r, &p(&format!("a/b/{HEX38}_00"))), Class::Result);
            for tmp in [".tmp.Ab3dEf.tmp", ".ccache.tmp.remove"] {
                assert_eq!(
                    class_of(&r, &p(&format!("a/b/{HEX38}{tmp}"))),
                    Class::Local,
                    "{tmp}"
                );
            }
        }
    }

    #[test]
    fn hex_names_outside_a_ccache_layout_are_ordinary_files() {
        let r = Rules::new(&[]).unwrap();
        for path in [
            "cafe.c",
            "add.a",
            "bad",
            "src/cafe",
            "a/bad",
            "ab/cd/deadbeefdeadbeefdeadbeefdeadbeefdeadbeef",
            "a/b/deadbeef",
            "x/a/b/0123-45",
        ] {
            assert_eq!(class_of(&r, path), Class::Mutable, "{path}");
        }
    }

    #[test]
    fn ccache_2_and_3_layouts() {
        let r = Rules::new(&[]).unwrap();
        // 3.x with cache_dir_levels 2 (30 digits) and 1 (31 digits); 2.x.
        let h = "23456789abcdef0123456789abcdef-1234";
        let h1 = "123456789abcdef0123456789abcdef-77";
        for prefix in ["", "cc/", "x/y/"] {
            let p = |s: &str| format!("{prefix}{s}");
            for suffix in ["", ".o", ".stderr", ".d", ".gcno", ".su", ".dia", ".dwo"] {
                assert_eq!(class_of(&r, &p(&format!("0/1/{h}{suffix}"))), Class::Result);
                assert_eq!(class_of(&r, &p(&format!("0/{h1}{suffix}"))), Class::Result);
            }
            assert_eq!(
                class_of(&r, &p(&format!("0/1/{h}.manifest"))),
                Class::Mutable
            );
            for tmp in [
                ".o.build7.4242.aB3dEf",
                ".o.tmp.stdout.build7.4242.aB3dEf",
                ".o.tmp.stderr.build7.4242.aB3dEf.2",
                ".manifest.tmp.build7.4242.aB3dEf",
                ".o.ccache.rm.tmp",
            ] {
                assert_eq!(
                    class_of(&r, &p(&format!("0/1/{h}{tmp}"))),
                    Class::Local,
                    "{tmp}"
                );
            }
            assert_eq!(class_of(&r, &p("0/stats")), Class::Local);
            assert_eq!(
                class_of(&r, &p("0/stats.tmp.build7.4242.aB3dEf")),
                Class::Local
            );
            assert_eq!(class_of(&r, &p("0/stats.lock")), Class::Local);
            // 2.x temporaries in the cache root.
            for tmp in [
                "tmp.stdout.build7.4242",
                "tmp.hash.build7.4242.o",
                "tmp.cpp_stderr.build7.4242",
                "hello.tmp.build7.4242.i",
            ] {
                assert_eq!(class_of(&r, &p(tmp)), Class::Local, "{tmp}");
            }
        }
    }

    #[test]
    fn ccache_4_0_to_4_6_temporaries_are_local() {
        let r = Rules::new(&[]).unwrap();
        // mkstemp's six characters may end in R, W, M or a hex digit.
        for x in ["AbcdeR", "AbcdeW", "AbcdeM", "Abcde1"] {
            assert_eq!(
                class_of(&r, &format!("a/e/c8aiq5frsd7ctaaepqbvl8shkb4kcjcR.tmp.{x}")),
                Class::Local
            );
        }
        assert_eq!(
            class_of(&r, "a/e/c8aiq5frsd7ctaaepqbvl8shkb4kcj0W"),
            Class::Result
        );
        assert_eq!(
            class_of(&r, "a/e/c8aiq5frsd7ctaaepqbvl8shkb4kcjcR.ccache.tmp.unlink"),
            Class::Local
        );
    }

    #[test]
    fn set_counts() {
        assert!(glob(b"[0-9]+", b"123"));
        assert!(!glob(b"[0-9]+", b""));
        assert!(glob(b"x[a-c]{2}y", b"xaby"));
        assert!(!glob(b"x[a-c]{2}y", b"xabcy"));
        assert!(glob(b"[a-c]{2,}", b"abcabc"));
        assert!(!glob(b"[a-c]{2,}", b"a"));
        assert!(glob(b"[a-c]{1,2}c", b"abc"));
        assert!(!glob(b"[a-c]{1,2}c", b"abcc"));
        assert!(glob(b"[0-9]+-[0-9]+", b"12-34"));
        // Malformed counts stay literal text.
        assert!(glob(b"[a]{x}", b"a{x}"));
        assert!(glob(b"[a]{", b"a{"));
    }

    #[test]
    fn overrides_come_first_and_bad_rules_are_refused() {
        let r = Rules::new(&["/keep/**=result".into(), "*.o=result".into()]).unwrap();
        assert_eq!(class_of(&r, "keep/x/stats"), Class::Result);
        assert_eq!(class_of(&r, "y/keep/x/stats"), Class::Local);
        assert_eq!(class_of(&r, "deep/foo.o"), Class::Result);
        assert!(Rules::new(&["foo".into()]).is_err());
        assert!(Rules::new(&["foo=bar".into()]).is_err());
    }

    #[test]
    fn unknown_names_are_mutable() {
        let r = Rules::new(&[]).unwrap();
        assert_eq!(class_of(&r, "README"), Class::Mutable);
    }
}
