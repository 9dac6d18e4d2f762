//! File classes: which names are create-only results, which are shared but
//! replaceable, which are host-local scratch. One table of path rules decides.
//!
//! A rule is `PATTERN=CLASS`. The pattern is matched against the *end* of
//! the file's path below the mount root, one `/`-separated component at a
//! time, so `tmp/**` matches `tmp/x` and `a/b/tmp/x/y`, and `stats` matches
//! any file named `stats`; a pattern starting with `/` is anchored at the
//! root. In a component, `*` matches any run of characters, `?` one
//! character, `[a-z0-9]` one character of a set; `**` matches any number of
//! components. Rules given on the command line come before the built-in
//! ones; the first match wins.
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

/// The built-in rules, for ccache ≤ 4.12 and ≥ 4.13 layouts. Documented in
/// the README; keep the two in step.
pub const DEFAULT_RULES: &[&str] = &[
    "tmp/**=local",
    "lock/**=local",
    "*.tmp=local",
    "*.lock=local",
    "*.alive=local",
    "stats=local",
    "ccache.conf=local",
    "CACHEDIR.TAG=local",
    "[0-9a-v][0-9a-v]*R=result",
    "[0-9a-v][0-9a-v]*W=result",
    "[0-9a-v][0-9a-v]*M=mutable",
    "[0-9a-f][0-9a-f]*[0-9a-f]=ccache-entry",
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

/// One-component glob: `*`, `?`, `[set]` with ranges.
fn glob(pat: &[u8], name: &[u8]) -> bool {
    match pat.split_first() {
        None => name.is_empty(),
        Some((b'*', rest)) => (0..=name.len()).any(|i| glob(rest, &name[i..])),
        Some((b'?', rest)) => !name.is_empty() && glob(rest, &name[1..]),
        Some((b'[', rest)) => {
            let Some(close) = rest.iter().position(|&c| c == b']') else {
                return name.first() == Some(&b'[') && glob(rest, &name[1..]);
            };
            let Some((&c, tail)) = name.split_first() else {
                return false;
            };
            in_set(&rest[..close], c) && glob(&rest[close + 1..], tail)
        }
        Some((&p, rest)) => name.first() == Some(&p) && glob(rest, &name[1..]),
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

    #[test]
    fn ccache_4_13_hex_names_are_decided_by_header() {
        let r = Rules::new(&[]).unwrap();
        let c = class_of(&r, "a/b/cdef0123456789abcdef0123456789");
        assert_eq!(c, Class::CcacheEntry);
        assert_eq!(c.resolve(&[0xcc, 0xac, 1, 0, 9]), Class::Result);
        assert_eq!(c.resolve(&[0xcc, 0xac, 1, 1, 9]), Class::Mutable);
        assert_eq!(c.resolve(b"garbage"), Class::Mutable);
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
