//! `cairn` — the example command-line tool over cairn-engine and cairn-pools.
//!
//! Exit codes: 0 success, 1 error, 2 usage error, 3 damage found,
//! 4 nothing done, on purpose (`--on-missing-cbt skip-alert`, a
//! pre-condition or pre-script that says no, a capacity shortfall), 5 busy
//! (a concurrent job), 6 a snapshot selector that matches several snapshots,
//! 7 a job run that did only part of its VMs.

// The argument docs below are clap's --help text (URI forms, <placeholders>),
// not rustdoc.
#![allow(rustdoc::broken_intra_doc_links, rustdoc::invalid_html_tags)]

mod cbt_cmd;
mod demo;
mod job_args;
mod job_cmd;
mod output;
mod rate_args;
mod retention_cmd;
mod schedule_cmd;
mod signals;
mod source_args;
mod tape_cmd;

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use std::num::NonZeroUsize;

use cairn_engine::format::PROP_SOURCE;
use cairn_engine::{
    BackupDisk, BackupOptions, ChunkingParams, Compression, CopyOptions, Error, Progress,
    RawFileSource, Repository, RestoreOptions, SnapshotSelector, VerifyOptions,
};
use cairn_pools::{OpenedPool, PoolOpenError};
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "cairn",
    version,
    about = "Back up and restore VM disks into a deduplicating pool"
)]
struct Cli {
    /// Where remote pools keep a verified local cache of index segments and
    /// manifests (default: $XDG_CACHE_HOME/cairn or ~/.cache/cairn).
    #[arg(long, global = true, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Do not cache anything locally.
    #[arg(long, global = true)]
    no_cache: bool,
    /// Where gc, verify and repair sort on disk (bounded memory; about
    /// 220 bytes per chunk of the pool at peak). Default: $CAIRN_SCRATCH_DIR,
    /// else $TMPDIR, else /var/tmp.
    #[arg(long, global = true, value_name = "DIR")]
    scratch_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

/// The cache settings given on the command line, for every pool opened.
static CACHE: std::sync::OnceLock<(Option<PathBuf>, bool)> = std::sync::OnceLock::new();

#[derive(Subcommand, Debug)]
enum Command {
    /// Initialise a new pool (a directory is created if missing; a bucket
    /// must exist).
    Init {
        /// Pool address: DIR, dedup:DIR, tape:DIR or
        /// s3://BUCKET/PREFIX[?endpoint=URL&region=R].
        pool: String,
        /// tape:DIR: blank cartridges in the new virtual tape library
        /// (1–999, default 8).
        #[arg(long, value_name = "N")]
        cartridges: Option<usize>,
        /// tape:DIR: each cartridge's capacity, like 96M or 18T (default
        /// LTO-9's 18 TB; files are sparse).
        #[arg(long, value_name = "SIZE")]
        cartridge_size: Option<String>,
        /// standard:DIR: incrementals per backup set before the next
        /// backup starts a new set with a full (0–365, default 7).
        #[arg(long, value_name = "N")]
        set_length: Option<u32>,
        /// tape pools: start a new media set with the first write after
        /// the open one is N days old (0–3650; default 0: only `cairn
        /// tape close` or a write error ends a set).
        #[arg(long, value_name = "N")]
        media_set_days: Option<u32>,
        #[arg(long)]
        json: bool,
    },
    /// Back up one VM's disks as one snapshot.
    Backup(Box<BackupArgs>),
    /// List snapshots.
    Snapshots {
        pool: String,
        #[arg(long)]
        vm: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Restore every disk of a snapshot as sparse raw files.
    Restore {
        pool: String,
        /// A full id, a unique prefix of at least 8 characters, or `latest`.
        snapshot: String,
        /// Target directory; each disk becomes DIR/<disk name>.
        #[arg(long)]
        to: PathBuf,
        /// Restrict `latest` to this VM.
        #[arg(long)]
        vm: Option<String>,
        /// Replace existing files in the target directory.
        #[arg(long)]
        force: bool,
        /// raw (sparse, default) or qcow2 (thin, written through qemu-nbd).
        #[arg(long, default_value = "raw")]
        format: cbt_cmd::RestoreFormat,
        /// Worker threads, or channels (1–64; default: one per CPU).
        #[arg(long, visible_alias = "channels", default_value_t = 0)]
        threads: usize,
        #[command(flatten)]
        write: source_args::WriteArgs,
        #[command(flatten)]
        rate: rate_args::RateArgs,
        #[command(flatten)]
        job: job_args::JobArgs,
        #[arg(long)]
        json: bool,
    },
    /// Copy snapshots to another pool without reading any disk: only the
    /// chunks the target lacks are moved (each verified on the way), and
    /// every copy keeps its snapshot id. Run it again after an
    /// interruption: what already arrived is not moved again.
    Copy {
        /// The pool to copy from.
        from: String,
        /// The pool to copy to (initialised with `cairn init`).
        to: String,
        /// Snapshots to copy: full ids, unique prefixes (8+ characters) or
        /// `latest` (with --vm). Default: every snapshot (of --vm).
        snapshots: Vec<String>,
        /// Only this VM's snapshots.
        #[arg(long)]
        vm: Option<String>,
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// How often the copy renews its writer lease in the target.
        #[arg(long, value_name = "DURATION", default_value = "30s")]
        lease_renewal: String,
        #[arg(long)]
        json: bool,
    },
    /// List the backup sets of a standard pool (standard:DIR).
    Sets {
        pool: String,
        #[arg(long)]
        json: bool,
    },
    /// Check the pool: references (default) and, with --read-data, every blob.
    Verify {
        pool: String,
        #[arg(long)]
        read_data: bool,
        /// Read only N % of the packs (1–100), a different share each day
        /// (or per --subset-window), so ⌈100/N⌉ runs cover the pool;
        /// implies --read-data.
        #[arg(long, value_name = "N%")]
        read_data_subset: Option<String>,
        /// Which share --read-data-subset reads (default: days since 1970).
        #[arg(long, value_name = "K")]
        subset_window: Option<u64>,
        #[arg(long, default_value_t = 0)]
        threads: usize,
        #[arg(long)]
        json: bool,
    },
    /// Repair a pool: rebuild the index (--index) and/or move damaged
    /// packs into quarantine after salvaging their intact blobs (--packs).
    Repair {
        pool: String,
        /// Rebuild the dedup index from the packs alone.
        #[arg(long, required_unless_present_any = ["packs", "tape_catalog"])]
        index: bool,
        /// Tape pools: rebuild the tape catalog (and the local copies of
        /// the configuration, index segments and manifests) by reading every
        /// cartridge in the library.
        #[arg(long)]
        tape_catalog: bool,
        /// Salvage and quarantine damaged packs (reads every pack), then
        /// rebuild the index.
        #[arg(long)]
        packs: bool,
        /// With --packs: report the damaged packs, change nothing.
        #[arg(long, requires = "packs")]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
    /// Apply a retention policy: keep what a rule keeps, remove the rest
    /// (manifests only; `cairn gc` reclaims the space). Without --keep-*
    /// rules, the policy stored in the pool.
    Prune {
        pool: String,
        #[command(flatten)]
        keep: retention_cmd::KeepArgs,
        /// Only this VM's snapshots.
        #[arg(long)]
        vm: Option<String>,
        /// Print the decisions, remove nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
    /// Remove the named snapshots (refused for protected ones).
    Forget {
        pool: String,
        /// Full ids or unique prefixes of at least 8 characters.
        #[arg(required = true)]
        snapshots: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Protect a snapshot from prune and forget (or, with --off, lift it).
    Protect {
        pool: String,
        snapshot: String,
        #[arg(long)]
        off: bool,
        #[arg(long)]
        json: bool,
    },
    /// Reclaim the space of chunks no snapshot references: delete packs
    /// without live data, repack sparse ones, compact the index. Safe
    /// beside running backups (it waits for those that started before it).
    Gc(retention_cmd::GcArgs),
    /// Inspect schedules without running anything.
    #[command(subcommand)]
    Schedule(schedule_cmd::ScheduleCommand),
    /// Jobs: add, list, show, run, history, log, remove.
    #[command(subcommand)]
    Job(job_cmd::JobCommand),
    /// Run the jobs of the state directory at their scheduled times.
    Daemon(job_cmd::DaemonArgs),
    /// Media sets of a tape pool: list, close, rotation, retire.
    #[command(subcommand)]
    Tape(tape_cmd::TapeCommand),
    /// The retention policy stored in a pool.
    #[command(subcommand)]
    Policy(retention_cmd::PolicyCommand),
    /// Show what a pool is and holds: kind, address, id, snapshots, packs,
    /// stored and logical bytes, dedup ratio, free space.
    PoolInfo {
        pool: String,
        #[arg(long)]
        json: bool,
    },
    /// Demonstrate backup → change → incremental → restore → verify on a sample disk.
    Demo {
        /// Working directory (default: a new temporary directory, removed afterwards).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Sample disk size in MiB.
        #[arg(long, default_value_t = 256)]
        size_mib: u64,
    },
}

/// `cairn backup` arguments.
#[derive(clap::Args, Debug, Clone)]
struct BackupArgs {
    pool: String,
    /// VM name recorded in the snapshot.
    #[arg(long)]
    vm: String,
    /// Disk images (raw files or block devices).
    disks: Vec<PathBuf>,
    /// Read a disk from an NBD export: nbd+unix:///EXPORT?socket=PATH
    /// or nbd://HOST[:PORT]/EXPORT. Repeat for each disk of the VM.
    #[arg(long, value_name = "URI", conflicts_with_all = ["disks", "stdin", "qcow2"])]
    nbd: Vec<String>,
    /// Back up a qcow2 file with CBT: runs qemu-nbd on it and rotates
    /// its dirty bitmaps with qemu-img (the file must not be open in a
    /// running VM). Repeat for each disk of the VM.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["disks", "stdin"])]
    qcow2: Vec<PathBuf>,
    /// With --nbd: the export's dirty bitmap holding the changes since the
    /// previous snapshot. With --qcow2: the name of the bitmap chain
    /// (bitmaps NAME.<token>, rotated each run and tracked by the pool;
    /// default "cairn").
    #[arg(long, value_name = "NAME")]
    bitmap: Option<String>,
    /// With --nbd: the bitmap that records changes from this backup on
    /// (default: the --bitmap itself keeps recording).
    #[arg(long, value_name = "NAME", requires = "nbd")]
    next_bitmap: Option<String>,
    /// When CBT cannot be trusted: full (read the whole disk, store only
    /// what changed), skip-alert (no snapshot, exit 4), skip (no snapshot).
    #[arg(long, value_name = "POLICY", default_value = "full")]
    on_missing_cbt: cairn_engine::cbt::CbtPolicy,
    /// NBD connections (streams) per disk for --nbd and --qcow2, 1–5.
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// With --nbd: fail a request the server has not answered after this
    /// long (like 30s or 2m).
    #[arg(long, value_name = "DURATION", default_value = "60s", requires = "nbd")]
    nbd_timeout: String,
    /// Before trusting a bitmap, read back N extents it marks clean
    /// (random, 0–4096 per disk) and compare them with the previous
    /// snapshot: catches a bitmap cleared or re-created after it.
    #[arg(long, value_name = "N", default_value_t = 0)]
    cbt_spot_check: u32,
    #[command(flatten)]
    rate: rate_args::RateArgs,
    /// Read one disk as a stream from standard input, named NAME.
    #[arg(long, value_name = "NAME")]
    stdin: Option<String>,
    /// Name for the disk at the same position (default: its file name).
    #[arg(long = "disk-name", value_name = "NAME")]
    disk_names: Vec<String>,
    /// fixed, fixed:SIZE (power of two, 4K–16M), cdc, or cdc:MIN:AVG:MAX.
    /// Default: fixed:64K for images, cdc for --stdin.
    #[arg(long)]
    chunking: Option<ChunkingParams>,
    /// none, fast (zstd:1, default), zstd, or zstd:LEVEL (1–19).
    #[arg(long, default_value = "fast")]
    compression: Compression,
    /// Worker threads (default: one per CPU).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Memory-map image files instead of reading them (faster; only for
    /// images nothing truncates during the backup: a shrinking file
    /// kills the process with SIGBUS).
    #[arg(long)]
    mmap: bool,
    /// How often the backup renews its writer lease (a garbage collection
    /// evicts a writer it sees unrenewed for 3 intervals or its
    /// --lease-expiry, whichever is longer).
    #[arg(long, value_name = "DURATION", default_value = "30s")]
    lease_renewal: String,
    /// Keep resume journals in DIR: a backup of image files interrupted
    /// (killed, cancelled, failed) and run again on unchanged files
    /// continues where it stopped instead of reading them from the start.
    #[arg(long, value_name = "DIR")]
    resume_dir: Option<PathBuf>,
    /// Read every image file, even one whose device, inode, size and
    /// times equal those its disk's newest snapshot recorded (such a file
    /// is otherwise not read: that snapshot's extents are reused).
    #[arg(long)]
    force_read: bool,
    /// Manifest version to write: 2 (extent lists in extent pages, memory
    /// flat at any disk size) or 1 (extent lists in the manifest, for
    /// pools that builds without version 2 must read). Tape pools always
    /// get 1.
    #[arg(long, value_name = "1|2", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=2))]
    manifest_version: u16,
    #[command(flatten)]
    source: source_args::SourceArgs,
    #[command(flatten)]
    job: job_args::JobArgs,
    #[arg(long)]
    json: bool,
}

/// A failure and the exit code it maps to.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
    /// A network-type failure (`--retries` tries again).
    pub transient: bool,
}

impl From<Error> for Failure {
    /// Maps an engine error to an exit code and adds the command-line advice
    /// the library's messages leave out.
    fn from(e: Error) -> Self {
        let code = match e {
            Error::InvalidArgument(_)
            | Error::TargetExists { .. }
            | Error::SnapshotProtected(_) => 2,
            Error::PoolBusy(_) | Error::LeaseLost { .. } => 5,
            Error::AmbiguousSnapshot { .. } => 6,
            _ => 1,
        };
        let hint = match &e {
            Error::NotInitialized { .. } => "; run `cairn init` first",
            Error::TargetExists { .. } => " (pass --force to overwrite)",
            Error::AmbiguousSnapshot { .. } => "; give a longer prefix, or --vm NAME",
            e if e.is_damage() => "; run `cairn verify` (and `cairn repair --index`)",
            _ => "",
        };
        Failure {
            code,
            message: format!("{e}{hint}"),
            transient: e.is_transient(),
        }
    }
}

/// `--threads N` (0: one per CPU).
pub fn threads(n: usize) -> Option<NonZeroUsize> {
    NonZeroUsize::new(n)
}

impl Failure {
    pub fn new(message: impl Into<String>) -> Self {
        Failure {
            code: 1,
            message: message.into(),
            transient: false,
        }
    }
    pub fn usage(message: impl Into<String>) -> Self {
        Failure {
            code: 2,
            message: message.into(),
            transient: false,
        }
    }
}

fn main() -> ExitCode {
    fix_malloc_threshold();
    let cli = Cli::parse();
    if let Some(dir) = &cli.scratch_dir {
        // Read by the engine's external sort; set before any thread starts.
        std::env::set_var("CAIRN_SCRATCH_DIR", dir);
    }
    signals::install();
    let code = match run(cli) {
        Ok(code) => code,
        Err(f) => {
            eprintln!("cairn: error: {}", f.message);
            match signals::received() {
                // Stopped by SIGINT / SIGTERM: the shell's convention.
                Some(sig) => 128 + sig as u8,
                None => f.code,
            }
        }
    };
    if std::env::var_os("CAIRN_PRINT_PEAK_RSS").is_some() {
        print_peak_rss();
    }
    ExitCode::from(code)
}

/// glibc raises its mmap threshold each time a block above it is freed (up
/// to 32 MiB); blocks below the raised threshold then come from per-thread
/// arenas, which keep what is freed. Peak memory would then grow with how
/// much a command processed (a verify that decoded large extent pages
/// first, then read gigabytes of packs) rather than with what it holds. A
/// fixed threshold keeps large buffers mapped and returns them when freed.
fn fix_malloc_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; called before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10);
    }
}

/// Diagnostics for memory tests and benchmarks: prints the process's peak
/// resident set (`VmHWM` of `/proc/self/status`) to stderr.
fn print_peak_rss() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    if let Some(line) = status.lines().find(|l| l.starts_with("VmHWM:")) {
        let kib = line.split_whitespace().nth(1).unwrap_or("0");
        eprintln!("cairn: peak-rss-kib {kib}");
    }
}

/// Opens (or, for `init`, creates) the pool at an address: `DIR`,
/// `dedup:DIR` or `s3://BUCKET/PREFIX?…` (see `cairn_pools::PoolAddress`).
pub fn open_pool(spec: &str, create: bool) -> Result<OpenedPool, Failure> {
    open_pool_with(spec, create, false)
}

/// [`open_pool`]; `bypass_cache` reads everything from the pool itself
/// (verify and repair check the pool, not a local copy of it).
pub fn open_pool_with(spec: &str, create: bool, bypass_cache: bool) -> Result<OpenedPool, Failure> {
    open_pool_raw(spec, create, bypass_cache).map_err(|e| match e {
        PoolOpenError::BadAddress { .. } => Failure::usage(e.to_string()),
        e => Failure::new(e.to_string()),
    })
}

/// [`open_pool_with`] with the pools' own error (jobs keep its kind: an
/// I/O error of a network type is retried).
pub fn open_pool_raw(
    spec: &str,
    create: bool,
    bypass_cache: bool,
) -> Result<OpenedPool, PoolOpenError> {
    let (cache_dir, no_cache) = CACHE.get().cloned().unwrap_or_default();
    let mut options = cairn_pools::OpenOptions::default();
    options.cache_dir = cache_dir;
    options.no_cache = no_cache || bypass_cache;
    options.create = create;
    cairn_pools::open_with(spec, &options)
}

/// An open repository and what its pool reports about itself.
pub struct Opened {
    /// The repository.
    pub repo: Repository,
    /// The pool as opened (address, request counter).
    pub pool: OpenedPool,
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opened")
            .field("pool", &self.pool)
            .finish_non_exhaustive()
    }
}

impl std::ops::Deref for Opened {
    type Target = Repository;
    fn deref(&self) -> &Repository {
        &self.repo
    }
}

impl Opened {
    /// The requests the pool made so far, per GiB of `bytes` (for `--json`;
    /// `null` for pools that do not bill per request).
    pub fn requests_json(&self, per: &str, bytes: u64) -> serde_json::Value {
        match &self.pool.requests {
            None => serde_json::Value::Null,
            Some(r) => {
                let total = r.total();
                let gib = bytes as f64 / (1u64 << 30) as f64;
                let mut v = serde_json::json!({ "total": total });
                if let Some(o) = v.as_object_mut() {
                    o.insert(
                        per.to_string(),
                        if gib > 0.0 {
                            serde_json::json!(total as f64 / gib)
                        } else {
                            serde_json::Value::Null
                        },
                    );
                }
                v
            }
        }
    }
}

/// The directory of a `standard:DIR` address.
pub fn standard_dir(spec: &str) -> Option<PathBuf> {
    match cairn_pools::PoolAddress::parse(spec) {
        Ok(cairn_pools::PoolAddress::Standard(dir)) => Some(dir),
        _ => None,
    }
}

/// The repository a backup of `vm` writes to: the pool, or — for a
/// standard pool — the VM's current backup set (a new one when the last is
/// full, so the backup reads everything).
pub fn open_repo_for_backup(spec: &str, vm: &str) -> Result<Opened, Failure> {
    let opened = open_repo(spec)?;
    if let Some(tape) = &opened.pool.tape {
        // Into the open media set, deduplicated within it.
        let repo = Repository::open(Arc::new(tape.current_set()?))?;
        return Ok(Opened {
            repo,
            pool: opened.pool,
        });
    }
    let Some(dir) = standard_dir(spec) else {
        return Ok(opened);
    };
    let set = cairn_pools::StandardPool::open(&dir)
        .map_err(|e| Failure::new(e.to_string()))?
        .backup_set(vm)?;
    let repo = Repository::open(Arc::new(set))?;
    Ok(Opened {
        repo,
        pool: opened.pool,
    })
}

fn cmd_sets(pool: &str, json: bool) -> Result<u8, Failure> {
    let Some(dir) = standard_dir(pool) else {
        return Err(Failure::usage(format!("{pool} is not a standard:DIR pool")));
    };
    let sets = cairn_pools::StandardPool::open(&dir)
        .map_err(|e| Failure::new(e.to_string()))?
        .sets()?;
    if json {
        output::print_json(&serde_json::Value::Array(
            sets.iter()
                .map(|s| serde_json::json!({"set": s.name, "vm": s.vm, "snapshots": s.snapshots}))
                .collect(),
        ));
    } else {
        println!("{:<40} {:<24} {:>9}", "set", "vm", "snapshots");
        for s in &sets {
            println!("{:<40} {:<24} {:>9}", s.name, s.vm, s.snapshots);
        }
    }
    Ok(0)
}

pub fn open_repo(spec: &str) -> Result<Opened, Failure> {
    open_repo_with(spec, false)
}

/// [`open_repo`], reading everything from the pool itself when
/// `bypass_cache` (see [`open_pool_with`]).
pub fn open_repo_with(spec: &str, bypass_cache: bool) -> Result<Opened, Failure> {
    let pool = open_pool_with(spec, false, bypass_cache)?;
    let repo = Repository::open(pool.pool.clone())?;
    Ok(Opened { repo, pool })
}

/// A terminal progress bar, or nothing.
#[derive(Debug)]
pub struct Bar(Option<indicatif::ProgressBar>);

impl Bar {
    pub fn new(enabled: bool) -> Self {
        if enabled && std::io::stderr().is_terminal() {
            let pb = indicatif::ProgressBar::new(0);
            pb.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg:12} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            Bar(Some(pb))
        } else {
            Bar(None)
        }
    }
    pub fn finish(&self) {
        if let Some(pb) = &self.0 {
            pb.finish_and_clear();
        }
    }
}

impl Progress for Bar {
    fn start(&self, total: u64) {
        if let Some(pb) = &self.0 {
            pb.set_length(total);
        }
    }
    fn advance(&self, bytes: u64) {
        if let Some(pb) = &self.0 {
            pb.inc(bytes);
        }
    }
    fn message(&self, msg: &str) {
        if let Some(pb) = &self.0 {
            pb.set_message(msg.to_string());
        }
    }
}

/// Names disks: `--disk-name` by position, else the file's base name;
/// repeated names get `-1`, `-2`, … suffixes.
pub fn disk_names(paths: &[PathBuf], overrides: &[String]) -> Result<Vec<String>, Failure> {
    if overrides.len() > paths.len() {
        return Err(Failure::usage(format!(
            "{} --disk-name values for {} disks",
            overrides.len(),
            paths.len()
        )));
    }
    let mut used: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = Vec::new();
    for (i, p) in paths.iter().enumerate() {
        let base = match overrides.get(i) {
            Some(n) => n.clone(),
            None => p
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .ok_or_else(|| Failure::usage(format!("{} has no file name", p.display())))?,
        };
        let mut name = base.clone();
        let mut n = 0;
        while used.contains_key(&name) {
            n += 1;
            name = format!("{base}-{n}");
        }
        used.insert(name.clone(), i);
        out.push(name);
    }
    Ok(out)
}

fn run(cli: Cli) -> Result<u8, Failure> {
    let _ = CACHE.set((cli.cache_dir, cli.no_cache));
    match cli.command {
        Command::Init {
            pool,
            cartridges,
            cartridge_size,
            set_length,
            media_set_days,
            json,
        } => cmd_init(
            &pool,
            (cartridges, cartridge_size.as_deref(), media_set_days),
            set_length,
            json,
        ),
        Command::Sets { pool, json } => cmd_sets(&pool, json),
        Command::Backup(args) => {
            let job = args.job.clone();
            if job.retries() > 0 && args.stdin.is_some() {
                return Err(Failure::usage(
                    "--retries cannot replay --stdin (a stream is read once)",
                ));
            }
            let vm = args.vm.clone();
            job.run("backup", &vm, || cmd_backup((*args).clone()))
        }
        Command::Snapshots { pool, vm, json } => cmd_snapshots(&pool, vm.as_deref(), json),
        Command::Restore {
            pool,
            snapshot,
            to,
            vm,
            force,
            format,
            threads,
            write,
            rate,
            job,
            json,
        } => job.run("restore", vm.as_deref().unwrap_or(""), || {
            cmd_restore(
                &pool,
                (&snapshot, vm.as_deref()),
                &to,
                force,
                format,
                (threads, &rate, &write),
                json,
            )
        }),
        Command::Copy {
            from,
            to,
            snapshots,
            vm,
            threads,
            lease_renewal,
            json,
        } => cmd_copy(&from, &to, &snapshots, vm, (threads, &lease_renewal), json),
        Command::Verify {
            pool,
            read_data,
            read_data_subset,
            subset_window,
            threads,
            json,
        } => cmd_verify(
            &pool,
            (read_data, read_data_subset.as_deref(), subset_window),
            threads,
            json,
        ),
        Command::Repair {
            pool,
            index,
            tape_catalog,
            packs,
            dry_run,
            json,
        } => {
            if tape_catalog {
                match cmd_repair_tape_catalog(&pool, json) {
                    Ok(0) if index || packs => {}
                    other => return other,
                }
            }
            // --packs rebuilds the index itself after moving packs aside.
            if packs {
                cmd_repair_packs(&pool, dry_run, json)
            } else {
                cmd_repair(&pool, json)
            }
        }
        Command::PoolInfo { pool, json } => cmd_pool_info(&pool, json),
        Command::Prune {
            pool,
            keep,
            vm,
            dry_run,
            json,
        } => retention_cmd::prune(&pool, &keep, vm, dry_run, json),
        Command::Forget {
            pool,
            snapshots,
            json,
        } => retention_cmd::forget(&pool, &snapshots, json),
        Command::Protect {
            pool,
            snapshot,
            off,
            json,
        } => retention_cmd::protect(&pool, &snapshot, off, json),
        Command::Policy(command) => retention_cmd::policy(command),
        Command::Gc(args) => retention_cmd::gc(&args),
        Command::Tape(command) => tape_cmd::run(command),
        Command::Schedule(command) => schedule_cmd::run(command),
        Command::Job(command) => job_cmd::run(command),
        Command::Daemon(args) => job_cmd::daemon(args),
        Command::Demo { dir, size_mib } => demo::run(dir.as_deref(), size_mib),
    }
}

fn cmd_pool_info(pool: &str, json: bool) -> Result<u8, Failure> {
    let opened = open_repo(pool)?;
    let info = opened.repo.info()?;
    let free = opened.repo.pool().free_bytes()?;
    if json {
        output::print_json(&serde_json::json!({
            "kind": opened.pool.address.kind(),
            "address": opened.pool.address.to_string(),
            "pool_id": opened.repo.config().pool_id,
            "snapshots": info.snapshots,
            "damaged_snapshots": info.damaged_snapshots,
            "packs": info.packs,
            "stored_bytes": info.stored_bytes,
            "logical_bytes": info.logical_bytes,
            "dedup_ratio": info.dedup_ratio(),
            "free_bytes": free,
        }));
    } else {
        println!("kind            {}", opened.pool.address.kind());
        println!("address         {}", opened.pool.address);
        println!("pool id         {}", opened.repo.config().pool_id);
        println!(
            "snapshots       {} ({} damaged)",
            info.snapshots, info.damaged_snapshots
        );
        println!("packs           {}", info.packs);
        println!("stored          {}", output::human(info.stored_bytes));
        println!("logical         {}", output::human(info.logical_bytes));
        match info.dedup_ratio() {
            Some(r) => println!("dedup ratio     {r:.2}"),
            None => println!("dedup ratio     -"),
        }
        match free {
            Some(f) => println!("free            {}", output::human(f)),
            None => println!("free            unknown"),
        }
    }
    Ok(0)
}

fn cmd_init(
    pool: &str,
    (cartridges, cartridge_size, media_set_days): (Option<usize>, Option<&str>, Option<u32>),
    set_length: Option<u32>,
    json: bool,
) -> Result<u8, Failure> {
    if let Some(n) = set_length {
        if standard_dir(pool).is_none() {
            return Err(Failure::usage("--set-length is for standard:DIR pools"));
        }
        if n > 365 {
            return Err(Failure::usage(format!(
                "--set-length {n} is out of range (0–365)"
            )));
        }
        let mut options = cairn_pools::OpenOptions::default();
        options.create = true;
        options.standard_set_length = Some(n);
        let p = cairn_pools::open_with(pool, &options)
            .map_err(|e| Failure::new(e.to_string()))?
            .pool;
        return init_pool(pool, p, json);
    }
    let tape = matches!(
        cairn_pools::PoolAddress::parse(pool),
        Ok(cairn_pools::PoolAddress::Tape(_))
    );
    if !tape && (cartridges.is_some() || cartridge_size.is_some()) {
        return Err(Failure::usage(
            "--cartridges and --cartridge-size are for tape:DIR pools",
        ));
    }
    if let Some(days) = media_set_days {
        if !is_tape(pool) {
            return Err(Failure::usage("--media-set-days is for tape pools"));
        }
        if days > 3650 {
            return Err(Failure::usage(format!(
                "--media-set-days {days} is out of range (0–3650)"
            )));
        }
    }
    let p = if tape {
        let capacity = match cartridge_size {
            None => cairn_pools::tape::LTO9_CAPACITY,
            Some(s) => cairn_engine::parse_size(s)
                .ok()
                .filter(|n| *n >= 1 << 20)
                .ok_or_else(|| {
                    Failure::usage(format!(
                        "--cartridge-size {s:?} is not a size of at least 1M (like 96M or 18T)"
                    ))
                })?,
        };
        let n = cartridges.unwrap_or(8);
        if !(1..=999).contains(&n) {
            return Err(Failure::usage(format!(
                "--cartridges {n} is out of range (1–999)"
            )));
        }
        let mut options = cairn_pools::OpenOptions::default();
        options.create = true;
        options.virtual_tape = Some(cairn_pools::tape::VirtualTapeOptions::new(n, capacity));
        cairn_pools::open_with(pool, &options).map_err(|e| match e {
            PoolOpenError::BadAddress { .. } => Failure::usage(e.to_string()),
            e => Failure::new(e.to_string()),
        })?
    } else {
        open_pool(pool, true)?
    };
    if let (Some(days), Some(tape)) = (media_set_days, &p.tape) {
        tape.set_rotation_days(days)?;
    }
    init_pool(pool, p.pool, json)
}

/// What a tape pool streamed to its drive (for `--json`).
pub fn tape_json(tape: &cairn_pools::tape::TapePool) -> serde_json::Value {
    let w = tape.write_stats();
    serde_json::json!({
        "objects_written": w.objects,
        "bytes_written": w.bytes,
        "streaming_seconds": w.streaming_seconds,
        "rate_held_mb_s": w.rate_held() / 1e6,
    })
}

/// Whether `spec` addresses a tape pool.
pub fn is_tape(spec: &str) -> bool {
    matches!(
        cairn_pools::PoolAddress::parse(spec),
        Ok(cairn_pools::PoolAddress::Tape(_) | cairn_pools::PoolAddress::TapeDevice { .. })
    )
}

fn init_pool(pool: &str, p: cairn_engine::DynPool, json: bool) -> Result<u8, Failure> {
    let config = Repository::init(p).map_err(|e| match e {
        Error::AlreadyExists { .. } => {
            Failure::new(format!("{pool} is already an initialised Cairn pool"))
        }
        e => e.into(),
    })?;
    if json {
        output::print_json(&serde_json::json!({
            "pool": pool, "pool_id": config.pool_id, "id_scheme": config.id_scheme.name(),
        }));
    } else {
        println!("initialised pool {pool} (id {})", config.pool_id);
    }
    Ok(0)
}

fn cmd_backup(args: BackupArgs) -> Result<u8, Failure> {
    let BackupArgs {
        pool,
        vm,
        disks,
        nbd,
        qcow2,
        bitmap,
        next_bitmap,
        on_missing_cbt,
        connections,
        nbd_timeout,
        cbt_spot_check,
        stdin,
        disk_names: names,
        chunking,
        compression,
        threads,
        mmap,
        lease_renewal,
        resume_dir,
        force_read,
        manifest_version,
        source,
        rate,
        job: _,
        json,
    } = args;
    source.check()?;
    if nbd.is_empty() && qcow2.is_empty() && source.reconnect_window()?.is_some() {
        return Err(Failure::usage(
            "--reconnect-window applies to --nbd and --qcow2 sources (files are local)",
        ));
    }
    let files: Vec<PathBuf> = disks.iter().chain(&qcow2).cloned().collect();
    if let Some(why) = source.capacity_shortfall(&files)? {
        eprintln!("cairn: not backed up: {why}");
        return Ok(4);
    }
    let show_progress = !json && source.log_level == source_args::LogLevel::Info;
    let throttle = rate.throttle()?;
    let lease_renewal = humantime::parse_duration(&lease_renewal).map_err(|e| {
        Failure::usage(format!(
            "--lease-renewal {lease_renewal:?} is not a duration (like 30s): {e}"
        ))
    })?;
    if !nbd.is_empty() || !qcow2.is_empty() {
        let bar = Arc::new(Bar::new(show_progress));
        let opts = BackupOptions::new(vm.clone())
            .with_parallel_disks(source.parallel_disks()?)
            .with_chunking(chunking.unwrap_or_default())
            .with_compression(compression)
            .with_threads(self::threads(threads))
            .with_lease_renewal(lease_renewal)
            .with_progress(bar.clone())
            .with_cancel(signals::token());
        let run = cbt_cmd::CbtRun {
            pool,
            nbd,
            qcow2,
            bitmap,
            next_bitmap,
            policy: on_missing_cbt,
            connections,
            nbd_timeout: humantime::parse_duration(&nbd_timeout)
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| {
                    Failure::usage(format!(
                        "--nbd-timeout {nbd_timeout:?} is not a positive duration (like 30s)"
                    ))
                })?,
            spot_check: cbt_spot_check,
            disk_names: names,
            throttle,
            read_buffer: source.read_buffer()?,
            reconnect_window: source.reconnect_window()?,
            warnings: source.log_level < source_args::LogLevel::Error,
            json,
        };
        return cbt_cmd::run_backup(run, opts, &bar);
    }
    if bitmap.is_some() {
        return Err(Failure::usage("--bitmap needs --nbd or --qcow2"));
    }
    if disks.is_empty() && stdin.is_none() {
        return Err(Failure::usage(
            "give at least one DISK, --stdin NAME, --nbd URI or --qcow2 FILE",
        ));
    }
    let mut repo = open_repo_for_backup(&pool, &vm)?;
    if let Some((t, rate_args::RateOn::Writes)) = &throttle {
        repo = rate_args::throttle_pool(repo, t.clone(), cairn_engine::jobs::Direction::Writes)?;
    }
    let mut inputs = Vec::new();
    let names = disk_names(&disks, &names)?;
    for (path, name) in disks.iter().zip(names) {
        let src = if mmap {
            RawFileSource::open_mapped(path)?
        } else {
            RawFileSource::open(path)?
        };
        inputs.push(
            BackupDisk::image(name, src).with_property(PROP_SOURCE, path.display().to_string()),
        );
    }
    if let Some(name) = &stdin {
        if inputs.iter().any(|d| &d.name == name) {
            return Err(Failure::usage(format!(
                "--stdin name {name:?} is already a disk name"
            )));
        }
        inputs.push(
            BackupDisk::stream(name.clone(), std::io::stdin()).with_property(PROP_SOURCE, "stdin"),
        );
    }
    let bar = Arc::new(Bar::new(show_progress));
    let opts = BackupOptions::new(vm.clone())
        .with_parallel_disks(source.parallel_disks()?)
        .with_chunking(chunking.unwrap_or(if disks.is_empty() {
            ChunkingParams::cdc()
        } else {
            ChunkingParams::default()
        }))
        .with_compression(compression)
        .with_threads(self::threads(threads))
        .with_lease_renewal(lease_renewal)
        .with_progress(bar.clone())
        .with_cancel(signals::token());
    let mut opts = opts;
    if let Some(dir) = resume_dir {
        opts = opts.with_resume_dir(dir);
    }
    opts.reuse_unchanged = !force_read;
    opts.extent_pages = manifest_version == 2;
    if let Some(n) = source.read_buffer()? {
        // Reads of image files are one request per batch.
        opts.batch_size = n;
    }

    // A test knob (undocumented on purpose): flush index segments after
    // this many new chunks, so memory tests cross a flush with small disks.
    if let Some(n) = std::env::var("CAIRN_SEGMENT_FLUSH_ENTRIES")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n > 0)
    {
        opts.segment_flush_entries = n;
    }
    // Test knobs too: small packs and batches, so kill tests of resume
    // cross many seals with small images.
    let knob = |name: &str| {
        std::env::var(name)
            .ok()
            .and_then(|v| cairn_engine::parse_size(&v).ok())
            .filter(|n| *n > 0)
    };
    if let Some(n) = knob("CAIRN_PACK_TARGET") {
        opts.pack_target = n;
        opts.pack_max_input = opts.pack_max_input.min(n.saturating_mul(2));
    }
    if let Some(n) = knob("CAIRN_BATCH_SIZE") {
        opts.batch_size = n as usize;
    }
    if let Some((t, rate_args::RateOn::Reads)) = &throttle {
        inputs = inputs.into_iter().map(|d| d.throttled(t.clone())).collect();
    }
    let stats = repo.backup(inputs, &opts);
    bar.finish();
    let stats = stats?;
    output::backup_warnings(&stats);
    if json {
        let mut v = output::backup_json(&vm, &stats);
        if let Some(o) = v.as_object_mut() {
            o.insert(
                "requests".into(),
                repo.requests_json("per_gib_stored", stats.bytes_new),
            );
            if let Some(tape) = &repo.pool.tape {
                o.insert("tape".into(), tape_json(tape));
            }
        }
        output::print_json(&v);
    } else {
        println!(
                "snapshot {} of {vm}: {} logical, {} read, {} new in pool ({} of {} chunks new) in {:.2}s",
                stats.snapshot,
                output::human(stats.bytes_logical),
                output::human(stats.bytes_read),
                output::human(stats.bytes_new),
                stats.chunks_new,
                stats.chunks_total,
                stats.seconds
            );
    }
    Ok(0)
}

fn cmd_snapshots(pool: &str, vm: Option<&str>, json: bool) -> Result<u8, Failure> {
    let repo = open_repo(pool)?;
    let list = repo.snapshots()?;
    for (id, e) in &list.damaged {
        eprintln!("cairn: warning: snapshot {id} cannot be read: {e}");
    }
    let snaps: Vec<_> = list
        .snapshots
        .iter()
        .filter(|s| vm.is_none_or(|v| s.vm == v))
        .collect();
    if json {
        output::print_json(&serde_json::Value::Array(
            snaps.iter().map(|s| output::snapshot_json(s)).collect(),
        ));
    } else {
        println!(
            "{:<16} {:<20} {:<20} {:>6} {:>10}  disks",
            "id", "time", "vm", "mode", "size"
        );
        for s in &snaps {
            println!(
                "{:<16} {:<20} {:<20} {:>6} {:>10}  {}{}",
                &s.id.to_hex()[..16],
                humantime::format_rfc3339_seconds(s.time),
                s.vm,
                s.mode,
                output::human(s.bytes_logical()),
                s.disks
                    .iter()
                    .map(|d| d.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                if s.damaged {
                    "  DAMAGED (see `cairn verify`)"
                } else {
                    ""
                }
            );
        }
    }
    // Listed what is readable; damaged manifests were named above.
    Ok(if list.damaged.is_empty() { 0 } else { 3 })
}

fn cmd_restore(
    pool: &str,
    (snapshot, vm): (&str, Option<&str>),
    to: &Path,
    force: bool,
    format: cbt_cmd::RestoreFormat,
    (threads, rate, write): (usize, &rate_args::RateArgs, &source_args::WriteArgs),
    json: bool,
) -> Result<u8, Failure> {
    let throttle = rate.throttle()?;
    if threads > 64 {
        return Err(Failure::usage(format!(
            "--threads (--channels) {threads} is out of range (1–64, or 0: one per CPU)"
        )));
    }
    let write_size = write.write_buffer()?;
    let parallel_disks = write.parallel_disks()?;
    let mut repo = open_repo(pool)?;
    let id = repo.resolve(&SnapshotSelector::parse(snapshot, vm)?)?;
    if let Some(tape) = repo.pool.tape.clone() {
        // From the newest media set holding the snapshot, alone: every
        // chunk it needs is there, and no other set's cartridge is asked
        // for (it may be off-site).
        if let Some(set) = tape.newest_set_with(cairn_engine::FileKind::Snapshot, &id.to_hex()) {
            repo = Opened {
                repo: Repository::open(Arc::new(tape.media_set(&set)?))?,
                pool: repo.pool,
            };
        }
    }
    let bar = Arc::new(Bar::new(!json));
    let mut opts = RestoreOptions::default()
        .with_threads(self::threads(threads))
        .with_overwrite(force)
        .with_parallel_disks(parallel_disks)
        .with_progress(bar.clone())
        .with_cancel(signals::token());
    opts.write_size = write_size;
    match throttle {
        Some((t, rate_args::RateOn::Reads)) => {
            repo = rate_args::throttle_pool(repo, t, cairn_engine::jobs::Direction::Reads)?;
        }
        Some((t, rate_args::RateOn::Writes)) => opts = opts.with_write_throttle(t),
        None => {}
    }
    let stats = match format {
        cbt_cmd::RestoreFormat::Raw => repo.restore_to_dir(&id, to, &opts),
        cbt_cmd::RestoreFormat::Qcow2 => cbt_cmd::restore_qcow2(&repo, &id, to, &opts),
    };
    bar.finish();
    let stats = stats?;
    if json {
        output::print_json(&serde_json::json!({
            "snapshot": id.to_hex(),
            "to": to.display().to_string(),
            "format": format.to_string(),
            "disks": stats.disks,
            "bytes_logical": stats.bytes_logical,
            "bytes_written": stats.bytes_written,
            "chunks": stats.chunks,
            "seconds": stats.seconds,
            "requests": repo.requests_json("per_gib_restored", stats.bytes_logical),
        }));
    } else {
        println!(
            "restored snapshot {id} ({} disks, {}) into {} in {:.2}s",
            stats.disks,
            output::human(stats.bytes_logical),
            to.display(),
            stats.seconds
        );
    }
    Ok(0)
}

fn cmd_copy(
    from: &str,
    to: &str,
    snapshots: &[String],
    vm: Option<String>,
    (threads, lease_renewal): (usize, &str),
    json: bool,
) -> Result<u8, Failure> {
    let lease_renewal = humantime::parse_duration(lease_renewal).map_err(|e| {
        Failure::usage(format!(
            "--lease-renewal {lease_renewal:?} is not a duration (like 30s): {e}"
        ))
    })?;
    let source = open_repo(from)?;
    let target = open_repo(to)?;
    let mut ids = Vec::new();
    for s in snapshots {
        ids.push(source.resolve(&SnapshotSelector::parse(s, vm.as_deref())?)?);
    }
    let bar = Arc::new(Bar::new(!json));
    let opts = CopyOptions::default()
        .with_snapshots(ids)
        .with_vm(vm)
        .with_lease_renewal(lease_renewal)
        .with_threads(self::threads(threads))
        .with_progress(bar.clone())
        .with_cancel(signals::token());
    let stats = match (standard_dir(to), &target.pool.tape) {
        (Some(dir), _) => copy_into_standard(&source, &target, &dir, &opts),
        // Into the open media set: what it lacks moves, even if an older
        // set holds it (each set restores on its own).
        (None, Some(tape)) => Repository::open(Arc::new(tape.current_set()?))
            .and_then(|set| source.copy_to(&set, &opts)),
        (None, None) => source.copy_to(&target, &opts),
    };
    bar.finish();
    let stats = stats?;
    if json {
        output::print_json(&serde_json::json!({
            "from": source.pool().location(),
            "to": target.pool().location(),
            "copied": stats.copied.iter().map(|i| i.to_hex()).collect::<Vec<_>>(),
            "present": stats.present.iter().map(|i| i.to_hex()).collect::<Vec<_>>(),
            "failed": stats
                .failed
                .iter()
                .map(|(i, e)| serde_json::json!({ "snapshot": i.to_hex(), "error": e }))
                .collect::<Vec<_>>(),
            "chunks_referenced": stats.chunks_referenced,
            "chunks_copied": stats.chunks_copied,
            "bytes_copied": stats.bytes_copied,
            "bytes_copied_raw": stats.bytes_copied_raw,
            "bytes_written": stats.bytes_written,
            "packs_written": stats.packs_written,
            "seconds": stats.seconds,
            "requests": target.requests_json("per_gib_copied", stats.bytes_copied),
            "tape": target.pool.tape.as_ref().map(tape_json),
        }));
    } else {
        for id in &stats.copied {
            println!("copied snapshot {id}");
        }
        for id in &stats.present {
            println!("snapshot {id} already in {}", target.pool().location());
        }
        println!(
            "{} snapshots copied, {} already there, {} not copied (damaged in the source); {} chunks ({}) moved in {:.2}s",
            stats.copied.len(),
            stats.present.len(),
            stats.failed.len(),
            stats.chunks_copied,
            output::human(stats.bytes_copied),
            stats.seconds
        );
    }
    for (id, e) in &stats.failed {
        eprintln!("cairn: snapshot {id} not copied: {e}");
    }
    // Like verify: 3 when damage kept something from being done.
    Ok(if stats.failed.is_empty() { 0 } else { 3 })
}

/// A copy into a standard pool goes snapshot by snapshot, oldest first,
/// each into its VM's current backup set (a new set when that one is
/// full), as a backup would.
fn copy_into_standard(
    source: &Repository,
    whole: &Repository,
    dir: &Path,
    opts: &CopyOptions,
) -> cairn_engine::Result<cairn_engine::CopyStats> {
    let list = source.snapshots()?;
    for id in &opts.snapshots {
        let known =
            list.snapshots.iter().any(|s| s.id == *id) || list.damaged.iter().any(|(d, _)| d == id);
        if !known {
            return Err(Error::SnapshotNotFound(format!(
                "{id} in {}",
                source.pool().location()
            )));
        }
    }
    let pool = cairn_pools::StandardPool::open(dir).map_err(Error::from)?;
    let mut total = cairn_engine::CopyStats::default();
    for (id, e) in &list.damaged {
        if opts.snapshots.is_empty() || opts.snapshots.contains(id) {
            total
                .failed
                .push((*id, format!("snapshot {id} cannot be read: {e}")));
        }
    }
    let started = std::time::Instant::now();
    for s in list.snapshots.iter().filter(|s| {
        (opts.snapshots.is_empty() || opts.snapshots.contains(&s.id))
            && opts.vm.as_deref().is_none_or(|vm| s.vm == vm)
    }) {
        match whole
            .pool()
            .size(cairn_engine::FileKind::Snapshot, &s.id.to_hex())
        {
            Ok(_) => {
                total.present.push(s.id);
                continue;
            }
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e),
        }
        let set = Repository::open(Arc::new(pool.backup_set(&s.vm)?))?;
        let one = opts.clone().with_snapshots(vec![s.id]).with_vm(None);
        let st = source.copy_to(&set, &one)?;
        total.copied.extend(st.copied);
        total.present.extend(st.present);
        total.failed.extend(st.failed);
        total.chunks_referenced += st.chunks_referenced;
        total.chunks_copied += st.chunks_copied;
        total.bytes_copied += st.bytes_copied;
        total.bytes_copied_raw += st.bytes_copied_raw;
        total.bytes_written += st.bytes_written;
        total.packs_written += st.packs_written;
    }
    total.seconds = started.elapsed().as_secs_f64();
    Ok(total)
}

fn cmd_verify(
    pool: &str,
    (read_data, subset, window): (bool, Option<&str>, Option<u64>),
    threads: usize,
    json: bool,
) -> Result<u8, Failure> {
    let mut opts = VerifyOptions::default().with_read_data(read_data);
    if let Some(subset) = subset {
        let percent: u8 = subset.trim_end_matches('%').parse().map_err(|_| {
            Failure::usage(format!(
                "--read-data-subset {subset:?} is not a percentage (1–100)"
            ))
        })?;
        let window = window.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() / 86_400)
                .unwrap_or(0)
        });
        opts = opts.with_read_data_subset(percent, window)?;
    }
    let read_data = opts.read_data;
    let repo = open_repo_with(pool, true)?;
    let bar = Arc::new(Bar::new(!json));
    let opts = opts
        .with_threads(self::threads(threads))
        .with_progress(bar.clone())
        .with_cancel(signals::token());
    if standard_dir(pool).is_some() {
        // Set by set: each must hold everything its snapshots need (the
        // whole pool would find a chunk lost in one set in another).
        let mut sets_json = Vec::new();
        let mut code = 0;
        for (name, set) in standard_sets(pool)? {
            let report = set.verify(&opts)?;
            if !report.is_ok() {
                code = 3;
            }
            if json {
                sets_json.push(serde_json::json!({
                    "set": name, "report": output::verify_json(&report, read_data),
                }));
            } else {
                println!("backup set {name}:");
                output::print_verify(&report, read_data);
            }
        }
        bar.finish();
        if json {
            output::print_json(&serde_json::json!({ "sets": sets_json }));
        }
        return Ok(code);
    }
    let report = repo.verify(&opts);
    bar.finish();
    let report = report?;
    if json {
        output::print_json(&output::verify_json(&report, read_data));
    } else {
        output::print_verify(&report, read_data);
    }
    Ok(if report.is_ok() { 0 } else { 3 })
}

fn cmd_repair_tape_catalog(pool: &str, json: bool) -> Result<u8, Failure> {
    let opened = open_pool_with(pool, false, true)?;
    let Some(tape) = opened.tape else {
        return Err(Failure::usage(format!(
            "--tape-catalog is for tape pools; {pool} is a {} pool",
            opened.address.kind()
        )));
    };
    let report = tape.rebuild_catalog()?;
    if json {
        output::print_json(&serde_json::json!({
            "objects": report.objects,
            "media_sets": tape.media_sets().len(),
            "skipped": report.skipped.iter()
                .map(|(b, why)| serde_json::json!({"cartridge": b, "why": why}))
                .collect::<Vec<_>>(),
        }));
    } else {
        println!(
            "tape catalog rebuilt: {} objects on {} media sets",
            report.objects,
            tape.media_sets().len()
        );
        for (b, why) in &report.skipped {
            println!("cartridge {b} skipped: {why}");
        }
    }
    Ok(0)
}

/// Each backup set of a standard pool with its repository.
fn standard_sets(pool: &str) -> Result<Vec<(String, Repository)>, Failure> {
    let Some(dir) = standard_dir(pool) else {
        return Ok(Vec::new());
    };
    let whole = cairn_pools::StandardPool::open(&dir).map_err(|e| Failure::new(e.to_string()))?;
    let mut out = Vec::new();
    for s in whole.sets()? {
        let face = whole.set(&s.name)?;
        out.push((s.name, Repository::open(Arc::new(face))?));
    }
    Ok(out)
}

fn refuse_on_tape(pool: &str, what: &str) -> Result<(), Failure> {
    if is_tape(pool) {
        return Err(Failure::usage(format!(
            "{what} does not run on tape pools: what is on tape stays there until its media set \
             is retired (cairn tape retire); `cairn repair {pool} --tape-catalog` rebuilds the \
             catalog from the cartridges"
        )));
    }
    Ok(())
}

fn cmd_repair(pool: &str, json: bool) -> Result<u8, Failure> {
    refuse_on_tape(pool, "repair --index")?;
    if standard_dir(pool).is_some() {
        let mut code = 0;
        for (name, set) in standard_sets(pool)? {
            let report = set.repair_index()?;
            if !json {
                println!(
                    "backup set {name}: index rebuilt from {} packs: {} chunks",
                    report.packs, report.entries
                );
            }
            if !report.damaged_packs.is_empty() {
                code = 3;
            }
        }
        return Ok(code);
    }
    // Opening reads the config only: the index is what we rebuild.
    let report = open_repo_with(pool, true)?.repair_index()?;
    if json {
        output::print_json(&serde_json::json!({
            "packs": report.packs,
            "entries": report.entries,
            "segments_removed": report.segments_removed,
            "damaged_packs": report.damaged_packs.iter()
                .map(|(p, e)| serde_json::json!({"pack": p.to_hex(), "error": e}))
                .collect::<Vec<_>>(),
        }));
    } else {
        println!(
            "index rebuilt from {} packs: {} chunks, {} old segments removed",
            report.packs, report.entries, report.segments_removed
        );
        for (p, e) in &report.damaged_packs {
            println!("damaged pack skipped: {p}: {e}");
        }
    }
    Ok(if report.damaged_packs.is_empty() {
        0
    } else {
        3
    })
}

fn cmd_repair_packs(pool: &str, dry_run: bool, json: bool) -> Result<u8, Failure> {
    refuse_on_tape(pool, "repair --packs")?;
    if standard_dir(pool).is_some() {
        let mut code = 0;
        for (name, set) in standard_sets(pool)? {
            let report = set.repair_packs(dry_run)?;
            if !json {
                println!(
                    "backup set {name}: {} damaged packs",
                    report.damaged_packs.len()
                );
            }
            if !report.damaged_packs.is_empty() {
                code = 3;
            }
        }
        return Ok(code);
    }
    let report = open_repo_with(pool, true)?.repair_packs(dry_run)?;
    if json {
        output::print_json(&serde_json::to_value(&report).unwrap_or_default());
    } else {
        for (p, why) in &report.damaged_packs {
            println!("damaged pack {p}: {why}");
        }
        let verb = if dry_run { "would move" } else { "moved" };
        println!(
            "{verb} {} packs into quarantine; {} intact blobs salvaged into {} new packs",
            if dry_run {
                report.damaged_packs.len()
            } else {
                report.quarantined.len()
            },
            report.blobs_salvaged,
            report.packs_written
        );
        for s in &report.damaged_snapshots {
            println!("snapshot {s} is still damaged (a new backup of the same data heals it)");
        }
    }
    Ok(if report.damaged_snapshots.is_empty() {
        0
    } else {
        3
    })
}

/// Removes a directory tree, ignoring errors (demo cleanup).
pub fn remove_tree(p: &Path) {
    let _ = std::fs::remove_dir_all(p);
}
