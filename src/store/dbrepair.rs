//! Damage to the metadata database itself (RocksDB's files under `meta/`):
//! telling it from other failures, saying in plain words what is damaged
//! and what `casfs fsck --repair` will do about it, and doing it.
//!
//! What can be damaged: `CURRENT` (one line naming the live manifest),
//! a `MANIFEST-*` (the list of table files), a table file (`*.sst`), a log
//! file, or the whole directory. RocksDB refuses to open such a database
//! (`Corruption: CURRENT file does not end with newline`), or fails a read
//! later (a block whose checksum does not match). A cache can always start
//! over, so the question is only how much to keep. The repair tries, in
//! order, stopping at the first that gives a database that opens:
//!
//! 1. Point `CURRENT` at the newest manifest (only when `CURRENT` is what
//!    is damaged). Loses nothing. Only the newest: RocksDB deletes table
//!    files a manifest does not list, so an older manifest would lose the
//!    newer tables that step 2 keeps.
//! 2. RocksDB's own repair (`DB::repair`): a new manifest from every table
//!    file that reads back and every log file. Loses the records of the
//!    files it cannot read (it moves them into `meta/lost/`), and a log
//!    batch that touched a column family no table file holds.
//! 3. Move the metadata aside and start with an empty database. Loses every
//!    name; the cache re-fills as compilers run.
//!
//! Invariants:
//! - Nothing an operator might want is deleted: before any step, the
//!   metadata as found is saved in `meta.damaged-<UTC time>/meta/` (table
//!   files hard-linked, the rest copied), step 3 moves the database there
//!   too, and the check that follows (`fsck`) moves blob files and staging
//!   files no record names any more into that directory instead of
//!   removing them (blob files are named by their hash, so whoever
//!   recovers the old names by hand can check every byte).
//! - Without `--repair` nothing in the store is changed (RocksDB may add a
//!   line to its own info log, `meta/LOG`, when an open fails).
//! - The store's lock is held throughout, so no daemon opens the store
//!   while its database is being repaired.

use std::fs;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::decode::shown;
use crate::store::meta::{self, meta_dir, OpenError, OpenMode, Store, StoreLock};

/// The magic number at the end of every block-based table file (the last
/// 8 bytes, little-endian): a file without it was cut short.
const TABLE_MAGIC: u64 = 0x88e2_41b7_85f4_cff7;

/// Longest `CURRENT` file read (it holds one manifest name).
const CURRENT_BYTES_MAX: u64 = 4096;

/// What is wrong with a store's metadata database.
#[derive(Clone, Debug)]
pub struct DbDamage {
    pub root: PathBuf,
    /// What is damaged, in plain words, one finding each.
    pub findings: Vec<String>,
    /// What RocksDB said, when it said something.
    pub rocksdb: Option<String>,
    /// The newest manifest, when `CURRENT` is what is damaged and there is
    /// one to point it at (step 1 of the repair).
    pub repoint: Option<String>,
    /// The database opens and reads; only its format record is missing.
    pub format_only: bool,
}

/// The RocksDB errors that mean the database's files are damaged or gone,
/// as opposed to the disk refusing (permissions, I/O errors, a full disk)
/// or another process holding the database.
fn is_damage(e: &rocksdb::Error) -> bool {
    let text = e.to_string();
    match e.kind() {
        rocksdb::ErrorKind::Corruption | rocksdb::ErrorKind::NotFound => true,
        rocksdb::ErrorKind::InvalidArgument => text.contains("does not exist"),
        rocksdb::ErrorKind::IOError => {
            text.contains("No such file or directory") || text.contains("Not a directory")
        }
        _ => false,
    }
}

impl DbDamage {
    /// The damage an open of the database failed with, or None if the
    /// failure is not damage (the caller reports it as it is).
    pub fn of_open_error(root: &Path, e: &rocksdb::Error) -> Option<DbDamage> {
        if !is_damage(e) {
            return None;
        }
        let mut d = inspect(root);
        d.rocksdb = Some(e.to_string());
        if d.findings.is_empty() {
            d.findings.push(
                named_in_message(e.as_ref())
                    .unwrap_or_else(|| "the database does not open".to_string()),
            );
        }
        Some(d)
    }

    /// The damage the database's files show (a `meta/` that is missing or
    /// no directory), found before RocksDB is asked.
    pub fn of_files(root: &Path) -> DbDamage {
        let mut d = inspect(root);
        if d.findings.is_empty() {
            d.findings.push("the database does not open".to_string());
        }
        d
    }

    /// The damage a read of an open database failed with (a block that
    /// does not match its checksum), or None if it is not damage.
    pub fn of_read_error(root: &Path, e: &rocksdb::Error) -> Option<DbDamage> {
        if e.kind() != rocksdb::ErrorKind::Corruption {
            return None;
        }
        let mut d = inspect(root);
        d.rocksdb = Some(e.to_string());
        d.findings
            .push(named_in_message(e.as_ref()).unwrap_or_else(|| {
                "a table file holds records that do not read back (checksum mismatch)".to_string()
            }));
        Some(d)
    }

    /// The database opens, but the record of the store's format is gone.
    pub fn format_record_missing(root: &Path) -> DbDamage {
        DbDamage {
            root: root.to_path_buf(),
            findings: vec![
                "the metadata has no format version record (lost with a damaged file?)".to_string(),
            ],
            rocksdb: None,
            repoint: None,
            format_only: true,
        }
    }

    /// One line for `casfs mount`: what is damaged and the exact command.
    pub fn mount_message(&self) -> String {
        let root = self.root.display();
        let said = match &self.rocksdb {
            Some(m) => format!(" (RocksDB: {m})"),
            None => String::new(),
        };
        format!(
            "the metadata database of store {root} is damaged: {}{said}. Nothing was changed. \
             Run `casfs fsck --store {root}` to see the plan, then `casfs fsck --store {root} --repair`, \
             which saves the damaged metadata in {root}/meta.damaged-<time>/ and then {}; \
             blob files are kept",
            self.findings.join("; "),
            self.steps_summary()
        )
    }

    fn steps_summary(&self) -> String {
        if self.format_only {
            return "writes the format record again (the marker file casfs-store says the format); \
                    nothing else is lost"
                .to_string();
        }
        let repair = "rebuilds the database with RocksDB's repair (the records of files it cannot \
                      read are lost: those names miss and the cache re-fills them), or as a last \
                      resort starts empty metadata (every name is lost; the cache re-fills)";
        match &self.repoint {
            Some(m) => {
                format!("points CURRENT at {m} (loses nothing), or if that does not open, {repair}")
            }
            None => repair.to_string(),
        }
    }

    /// What `--repair` will do, step by step, with what each step loses.
    pub fn plan(&self) -> Vec<String> {
        let root = self.root.display();
        let mut p = vec![format!(
            "save the metadata as found in {root}/meta.damaged-<time>/meta/ (table files hard-linked, \
             the rest copied); nothing is deleted"
        )];
        if self.format_only {
            p.push(
                "write the format version record again (the marker file casfs-store says the format); \
                 loses nothing"
                    .to_string(),
            );
        } else {
            if let Some(m) = &self.repoint {
                p.push(format!(
                    "point CURRENT at {m}, the newest manifest, and open the database: loses nothing"
                ));
            }
            p.push(
                "if that does not open: rebuild the database with RocksDB's repair, from every table \
                 and log file that reads back; loses the records in the files it cannot read (RocksDB \
                 moves those to meta/lost/): their names are gone and miss, and the cache re-fills them"
                    .to_string(),
            );
            p.push(format!(
                "if that does not open either: move the database into {root}/meta.damaged-<time>/ and \
                 start with empty metadata; loses every name (the cache re-fills as compilers run)"
            ));
        }
        p.push(
            "then check the whole store and repair what lost records leave behind (references, \
             gauges, leases); blob files and staging files no record names any more are moved into \
             meta.damaged-<time>/ with the old metadata, not removed"
                .to_string(),
        );
        p
    }
}

/// A table file named in a RocksDB message, with what the message says
/// about it.
fn named_in_message(msg: &str) -> Option<String> {
    let file = msg
        .split(|c: char| c.is_whitespace() || c == ':' || c == ',')
        .find(|w| w.ends_with(".sst") || w.contains("MANIFEST-") || w.ends_with(".log"))?;
    let name = Path::new(file)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| file.to_string());
    let what = if msg.contains("No such file") || msg.contains("does not exist") {
        "is missing"
    } else if name.starts_with("MANIFEST-") {
        "(the list of table files) does not read back"
    } else {
        "is damaged or cut short"
    };
    Some(format!("{name} {what}"))
}

/// Looks at the database's files for the damage RocksDB reports in its
/// own words: `CURRENT`, the manifests, and the end of every table file.
fn inspect(root: &Path) -> DbDamage {
    let meta = meta_dir(root);
    let mut d = DbDamage {
        root: root.to_path_buf(),
        findings: Vec::new(),
        rocksdb: None,
        repoint: None,
        format_only: false,
    };
    match fs::metadata(&meta) {
        Err(_) => {
            d.findings.push(format!(
                "the metadata directory {} is missing",
                meta.display()
            ));
            return d;
        }
        Ok(m) if !m.is_dir() => {
            d.findings
                .push(format!("{} is not a directory", meta.display()));
            return d;
        }
        Ok(_) => {}
    }
    let mut manifests: Vec<(u64, String)> = Vec::new();
    let mut tables: Vec<PathBuf> = Vec::new();
    for e in fs::read_dir(&meta).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(n) = name.strip_prefix("MANIFEST-").and_then(|n| n.parse().ok()) {
            manifests.push((n, name));
        } else if name.ends_with(".sst") {
            tables.push(e.path());
        }
    }
    manifests.sort();
    let newest = manifests.last().map(|(_, n)| n.clone());
    let current_bad = match read_current(&meta.join("CURRENT")) {
        Err(why) => Some(why),
        Ok(text) => match text.strip_suffix('\n') {
            None => Some(format!(
                "CURRENT does not end with a newline (it holds {} bytes: {})",
                text.len(),
                shown(text.as_bytes())
            )),
            Some(name) if !name.starts_with("MANIFEST-") => Some(format!(
                "CURRENT names {}, which is no manifest",
                shown(name.as_bytes())
            )),
            Some(name) if !meta.join(name).exists() => {
                Some(format!("CURRENT names {name}, which does not exist"))
            }
            Some(_) => None,
        },
    };
    if let Some(why) = current_bad {
        d.findings.push(why);
        d.repoint = newest.clone();
    }
    if manifests.is_empty() {
        d.findings
            .push("there is no MANIFEST file (the list of table files)".to_string());
    }
    tables.sort();
    for t in tables {
        if let Some(why) = table_damage(&t) {
            d.findings.push(format!(
                "table file {} {why}",
                t.file_name().unwrap_or_default().to_string_lossy()
            ));
        }
    }
    d
}

fn read_current(path: &Path) -> Result<String, String> {
    let f = fs::File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => "CURRENT is missing".to_string(),
        _ => format!("CURRENT cannot be read: {e}"),
    })?;
    let mut bytes = Vec::new();
    f.take(CURRENT_BYTES_MAX)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("CURRENT cannot be read: {e}"))?;
    if bytes.is_empty() {
        return Err("CURRENT is empty".to_string());
    }
    String::from_utf8(bytes).map_err(|e| {
        format!(
            "CURRENT holds bytes that are no file name ({})",
            shown(e.as_bytes())
        )
    })
}

/// Why a table file is damaged, if its end says so: every table file ends
/// with a footer whose last 8 bytes are `TABLE_MAGIC`.
fn table_damage(path: &Path) -> Option<String> {
    let f = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) => return Some(format!("cannot be read ({e})")),
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if len < 8 {
        return Some(format!("is cut short ({len} bytes)"));
    }
    let mut tail = [0u8; 8];
    if let Err(e) = f.read_exact_at(&mut tail, len - 8) {
        return Some(format!("cannot be read ({e})"));
    }
    (u64::from_le_bytes(tail) != TABLE_MAGIC)
        .then(|| format!("is cut short or damaged ({len} bytes, no table footer at its end)"))
}

/// What the repair did.
#[derive(Debug)]
pub struct Repaired {
    /// Where the metadata as found was saved.
    pub saved: PathBuf,
    /// What was tried, in order, and how it went.
    pub steps: Vec<String>,
    pub outcome: Outcome,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    FormatRestored,
    /// `CURRENT` names this manifest again.
    Repointed(String),
    /// RocksDB's repair; these files were moved into `meta/lost/`.
    RocksdbRepair {
        lost: Vec<String>,
    },
    /// Empty metadata; the old database is in `saved`.
    Started,
}

impl Outcome {
    /// What the outcome costs, in one sentence.
    pub fn loses(&self) -> String {
        match self {
            Outcome::FormatRestored | Outcome::Repointed(_) => "no record is lost".to_string(),
            Outcome::RocksdbRepair { lost } if lost.is_empty() => {
                "every table file that is there read back; what a missing file held is lost (the \
                 check below drops what pointed at it, and the cache re-fills those names)"
                    .to_string()
            }
            Outcome::RocksdbRepair { lost } => format!(
                "the records in {} are lost (RocksDB moved {} to meta/lost/): the names they held \
                 miss, and the cache re-fills them",
                lost.join(", "),
                if lost.len() == 1 { "it" } else { "them" }
            ),
            Outcome::Started => {
                "every name is lost: lookups miss, and the cache re-fills as compilers run"
                    .to_string()
            }
        }
    }
}

/// Brings a damaged database back to one that opens, by the steps in the
/// module doc, with the store's lock held throughout. Returns the open
/// store (its lock still held) for the check that must follow.
pub fn repair(
    root: &Path,
    damage: &DbDamage,
    lock: StoreLock,
) -> Result<(Store, Repaired), String> {
    let saved = save_as_found(root)?;
    let mut steps = vec![if saved.join("meta").is_dir() {
        format!(
            "saved the metadata as found in {}",
            saved.join("meta").display()
        )
    } else {
        format!(
            "nothing to save ({} is no directory); made {} for what the repair moves aside",
            meta_dir(root).display(),
            saved.display()
        )
    }];
    let mut lock = lock;
    let meta = meta_dir(root);
    let done = |store: Store, steps: Vec<String>, outcome: Outcome| {
        Ok((
            store,
            Repaired {
                saved: saved.clone(),
                steps,
                outcome,
            },
        ))
    };

    if damage.format_only {
        match meta::open_locked(root, lock, OpenMode::Repaired) {
            Ok(store) => {
                steps.push("wrote the format version record again".to_string());
                return done(store, steps, Outcome::FormatRestored);
            }
            Err((e, l)) => {
                steps.push(format!("writing the format record failed: {e}"));
                lock = l;
            }
        }
    }

    if let Some(manifest) = &damage.repoint {
        match write_current(&meta, manifest) {
            Err(e) => steps.push(format!("pointing CURRENT at {manifest} failed: {e}")),
            Ok(()) => match meta::open_locked(root, lock, OpenMode::Repaired) {
                Ok(store) => {
                    steps.push(format!("pointed CURRENT at {manifest}: the database opens"));
                    return done(store, steps, Outcome::Repointed(manifest.clone()));
                }
                Err((e, l)) => {
                    steps.push(format!(
                        "pointed CURRENT at {manifest}, but the database still does not open: {}",
                        short(&e)
                    ));
                    lock = l;
                }
            },
        }
    }

    if meta.is_dir() {
        let before = lost_files(&meta);
        match rocksdb::DB::repair(&meta::repair_options(), &meta) {
            Err(e) => steps.push(format!("RocksDB's repair failed: {e}")),
            Ok(()) => {
                let lost: Vec<String> = lost_files(&meta)
                    .into_iter()
                    .filter(|f| !before.contains(f))
                    // Log files are always moved there once turned into tables.
                    .filter(|f| f.ends_with(".sst"))
                    .collect();
                match meta::open_locked(root, lock, OpenMode::Repaired) {
                    Ok(store) => {
                        steps.push(if lost.is_empty() {
                            "rebuilt the database with RocksDB's repair: every table file read back"
                                .to_string()
                        } else {
                            format!(
                                "rebuilt the database with RocksDB's repair; it could not read {} \
                                 (moved to meta/lost/)",
                                lost.join(", ")
                            )
                        });
                        return done(store, steps, Outcome::RocksdbRepair { lost });
                    }
                    Err((e, l)) => {
                        steps.push(format!(
                            "RocksDB's repair ran, but the database still does not open: {}",
                            short(&e)
                        ));
                        lock = l;
                    }
                }
            }
        }
    }

    // The last resort: the database goes aside, whole, and a new one starts.
    if fs::symlink_metadata(&meta).is_ok() {
        let aside = saved.join("meta.after-repair-attempts");
        fs::rename(&meta, &aside).map_err(|e| {
            format!(
                "cannot move the damaged database {} aside to {}: {e}; nothing else was changed",
                meta.display(),
                aside.display()
            )
        })?;
        steps.push(format!(
            "moved the database (as the attempts above left it) to {}",
            aside.display()
        ));
    }
    match meta::open_locked(root, lock, OpenMode::Create) {
        Ok(store) => {
            steps.push("started empty metadata".to_string());
            done(store, steps, Outcome::Started)
        }
        Err((e, _)) => Err(format!("cannot start empty metadata: {e}")),
    }
}

fn short(e: &OpenError) -> String {
    match e {
        OpenError::Damaged(d) => d.rocksdb.clone().unwrap_or_else(|| d.findings.join("; ")),
        OpenError::Other(m) => m.clone(),
    }
}

fn lost_files(meta: &Path) -> Vec<String> {
    fs::read_dir(meta.join("lost"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// Writes `CURRENT` naming `manifest`: a new file, synced, renamed over the
/// old one (as RocksDB itself writes it).
fn write_current(meta: &Path, manifest: &str) -> std::io::Result<()> {
    let tmp = meta.join("CURRENT.casfs-repair");
    {
        let mut f = fs::File::create(&tmp)?;
        std::io::Write::write_all(&mut f, format!("{manifest}\n").as_bytes())?;
        f.sync_all()?;
    }
    fs::rename(&tmp, meta.join("CURRENT"))?;
    fs::File::open(meta)?.sync_all()
}

/// Saves the database's files as they are now in a new
/// `meta.damaged-<UTC time>/meta/` of the store: table files (immutable)
/// hard-linked, everything else copied. Returns the new directory.
fn save_as_found(root: &Path) -> Result<PathBuf, String> {
    let stamp = utc_stamp(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    );
    let mut dir = root.join(format!("meta.damaged-{stamp}"));
    let mut n = 1;
    while dir.exists() {
        n += 1;
        dir = root.join(format!("meta.damaged-{stamp}-{n}"));
    }
    fs::create_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let meta = meta_dir(root);
    if meta.is_dir() {
        copy_tree(&meta, &dir.join("meta")).map_err(|e| {
            format!(
                "cannot save the metadata into {}: {e}; nothing was repaired",
                dir.display()
            )
        })?;
    }
    Ok(dir)
}

fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    fs::create_dir(to)?;
    for e in fs::read_dir(from)? {
        let e = e?;
        let (src, dst) = (e.path(), to.join(e.file_name()));
        let kind = e.file_type()?;
        if kind.is_dir() {
            copy_tree(&src, &dst)?;
        } else if kind.is_file() {
            let immutable = e.file_name().to_string_lossy().ends_with(".sst");
            if !(immutable && fs::hard_link(&src, &dst).is_ok()) {
                fs::copy(&src, &dst)?;
            }
        }
    }
    Ok(())
}

/// `YYYYmmddTHHMMSSZ` for seconds since the epoch (UTC).
fn utc_stamp(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_stamps_are_calendar_dates() {
        assert_eq!(utc_stamp(0), "19700101T000000Z");
        assert_eq!(utc_stamp(951_782_400), "20000229T000000Z");
        assert_eq!(utc_stamp(1_735_689_599), "20241231T235959Z");
    }

    #[test]
    fn table_files_named_in_rocksdb_messages_are_found() {
        let m = "Corruption: file is too short (12 bytes) to be an sstable: /s/meta/000012.sst";
        assert_eq!(
            named_in_message(m).unwrap(),
            "000012.sst is damaged or cut short"
        );
        let m = "IO error: No such file or directory: While open a file for random read: /s/meta/000009.sst";
        assert_eq!(named_in_message(m).unwrap(), "000009.sst is missing");
        assert!(named_in_message("Corruption: something else").is_none());
    }
}
