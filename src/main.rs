//! `casfs`: the command line. Flags are parsed raw by clap, validated into
//! ready-to-use values here, and errors become exit codes here and nowhere
//! else (0 ok, 1 failed, 2 usage).

mod blobs;
mod classes;
mod clock;
mod core;
mod error;
mod fuse;
mod ids;
mod meta;
mod mount;
mod stats;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "casfs",
    version,
    about = "A content-addressed FUSE filesystem for shared compiler caches"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Mount a cache and serve it in the foreground until it is unmounted.
    Mount {
        /// Store directory [default: /var/cache/casfs as root, else $XDG_CACHE_HOME/casfs or ~/.cache/casfs]
        #[arg(long)]
        store: Option<PathBuf>,
        /// Class rule PATTERN=CLASS (result, mutable, local, ccache-entry), before the built-in rules; repeatable
        #[arg(long = "class", value_name = "PATTERN=CLASS")]
        classes: Vec<String>,
        /// Percentage of blob opens verified against their hash (0-100)
        #[arg(long, default_value_t = 100)]
        verify_percent: u32,
        /// Mount options, comma separated: allow_other
        #[arg(short = 'o', value_name = "OPTS")]
        options: Option<String>,
        /// Mount over a non-empty directory
        #[arg(long)]
        force: bool,
        /// Threads serving kernel requests
        #[arg(long, default_value_t = 4)]
        threads: usize,
        mountpoint: PathBuf,
    },
    /// Unmount a casfs mount (also one whose daemon died).
    Unmount {
        /// Detach now even if busy; the mount goes when the last user leaves
        #[arg(long)]
        lazy: bool,
        mountpoint: PathBuf,
    },
    /// Print a mount's statistics (the text of MOUNTPOINT/.casfs/stats).
    Stats { mountpoint: PathBuf },
}

fn default_store() -> PathBuf {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/cache/casfs");
    }
    match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        Some(x) => PathBuf::from(x).join("casfs"),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/casfs"),
    }
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Mount {
            store,
            classes,
            verify_percent,
            options,
            force,
            threads,
            mountpoint,
        } => {
            if verify_percent > 100 {
                return Err(format!(
                    "--verify-percent {verify_percent} is not a percentage (0-100)"
                ));
            }
            let rules = classes::Rules::new(&classes)?;
            let mut allow_other = false;
            for opt in options
                .iter()
                .flat_map(|o| o.split(','))
                .filter(|o| !o.is_empty())
            {
                match opt {
                    "allow_other" => allow_other = true,
                    other => {
                        return Err(format!(
                            "unknown mount option {other:?} (known: allow_other)"
                        ))
                    }
                }
            }
            let store = store.unwrap_or_else(default_store);
            mount::run(mount::MountArgs {
                store,
                mountpoint,
                config: core::Config {
                    rules,
                    verify_percent,
                },
                allow_other,
                force,
                threads,
            })
        }
        Command::Unmount { lazy, mountpoint } => mount::unmount(&mountpoint, lazy),
        Command::Stats { mountpoint } => {
            let path = Path::new(&mountpoint).join(".casfs/stats");
            let text = std::fs::read_to_string(&path).map_err(|e| {
                format!(
                    "cannot read {}: {e} (is {} a casfs mount?)",
                    path.display(),
                    mountpoint.display()
                )
            })?;
            print!("{text}");
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    // fuser warns when it finds the mount already gone at exit (our normal
    // way out after `umount`), so its session module logs errors only.
    env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("info,fuser::session=error"),
    )
    .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("casfs: {e}");
            ExitCode::FAILURE
        }
    }
}
