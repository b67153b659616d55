//! The command line.

use std::path::PathBuf;

use clap::{Args as ClapArgs, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "cbtvault",
    version,
    about = "Incremental, changed-block-tracking backups of virtual disks"
)]
pub struct Args {
    #[command(flatten)]
    pub global: Global,
    #[command(flatten)]
    pub keys: KeyArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// How many clients `serve` takes, and for how long.
#[derive(ClapArgs, Debug, Clone, Copy)]
pub struct ServeLimits {
    /// Clients served at once. When full, a new client replaces the one
    /// that waited longest on its own side (idle, in the handshake, or not
    /// reading replies); if all are busy it is turned away.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub max_connections: u32,
    /// Clients from one IP address (or one user on a unix socket) at once.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub max_connections_per_peer: u32,
    /// Close a connection whose client sends no request and reads no
    /// reply for this many seconds (0: never).
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(0..=31_536_000))]
    pub idle_timeout: u64,
}

#[derive(ClapArgs, Debug, Clone, Copy)]
pub struct Global {
    /// Print only errors (no progress, no summaries).
    #[arg(long, short, global = true)]
    pub quiet: bool,
    /// Print machine-readable JSON on stdout.
    #[arg(long, global = true)]
    pub json: bool,
    /// More log output on stderr (-v info, -vv debug); RUST_LOG overrides.
    #[arg(long, short, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

/// How an encrypted repository's key is given (never in argv): a key
/// file, a passphrase file, `CBTVAULT_PASSWORD`, or else a prompt on the
/// terminal. (`--password-file` names the XenServer password elsewhere.)
#[derive(ClapArgs, Debug, Clone, Default)]
pub struct KeyArgs {
    /// A file whose first line is the passphrase of an encrypted repository.
    #[arg(
        long,
        global = true,
        env = "CBTVAULT_PASSWORD_FILE",
        value_name = "FILE"
    )]
    pub repo_password_file: Option<PathBuf>,
    /// A key file of an encrypted repository (its whole content is the key).
    #[arg(
        long,
        global = true,
        env = "CBTVAULT_KEY_FILE",
        value_name = "FILE",
        conflicts_with = "repo_password_file"
    )]
    pub repo_key_file: Option<PathBuf>,
}

/// Where a new passphrase or key file comes from (`key add`, `key passwd`).
#[derive(ClapArgs, Debug, Clone)]
pub struct NewKeyArgs {
    /// A file whose first line is the new passphrase (else
    /// CBTVAULT_NEW_PASSWORD, else a prompt on the terminal).
    #[arg(long, value_name = "FILE")]
    pub new_password_file: Option<PathBuf>,
    /// A key file to add (its whole content is the key; e.g. 64 bytes
    /// from /dev/urandom).
    #[arg(long, value_name = "FILE", conflicts_with = "new_password_file")]
    pub new_key_file: Option<PathBuf>,
}

/// Key slots of an encrypted repository.
#[derive(Subcommand, Debug)]
pub enum KeyCommand {
    /// List the key slots (ids, kinds, creation times).
    List {
        #[command(flatten)]
        repo: RepoArg,
    },
    /// Add a passphrase or key file; no data is rewritten.
    Add {
        #[command(flatten)]
        repo: RepoArg,
        #[command(flatten)]
        new: NewKeyArgs,
    },
    /// Remove a key slot (never the last one, nor the one given to open).
    Remove {
        #[command(flatten)]
        repo: RepoArg,
        /// The slot's id, as `key list` shows it.
        id: String,
    },
    /// Replace the key given to open by a new passphrase or key file.
    Passwd {
        #[command(flatten)]
        repo: RepoArg,
        #[command(flatten)]
        new: NewKeyArgs,
    },
}

#[derive(ClapArgs, Debug, Clone)]
pub struct RepoArg {
    /// The repository directory.
    #[arg(long, env = "CBTVAULT_REPO")]
    pub repo: PathBuf,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create a repository.
    Init {
        #[command(flatten)]
        repo: RepoArg,
        /// Default zstd level for new blocks (1-22).
        #[arg(long, default_value_t = 3)]
        compression_level: i32,
        /// Target pack size in MiB (each backup holds at most two packs in
        /// memory).
        #[arg(long, default_value_t = cbtvault_repo::DEFAULT_PACK_SIZE >> 20)]
        pack_size_mib: u64,
        /// Take backups and copies only: forget, gc and retention are
        /// refused, so nothing that backs up into it can erase its history
        /// (for protection against the host itself, see docs/cli.md).
        #[arg(long)]
        append_only: bool,
        /// Encrypt everything stored (XChaCha20-Poly1305, keyed ids): the
        /// passphrase comes from --repo-password-file, CBTVAULT_PASSWORD or
        /// a prompt; a key file from --repo-key-file.
        #[arg(long)]
        encrypt: bool,
    },
    /// Manage the passphrases and key files of an encrypted repository.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Back up a disk: all of it, or only the blocks a changed-block map marks.
    Backup(Box<BackupArgs>),
    /// List restore points (times in the local time zone; UTC with --json).
    List {
        #[command(flatten)]
        repo: RepoArg,
        /// Only this disk.
        #[arg(long)]
        disk: Option<String>,
        /// Only the disks of this VM (its name or uuid).
        #[arg(long, value_name = "NAME|UUID")]
        vm: Option<String>,
        /// Only restore points taken at or after TIME: RFC 3339, or a date
        /// (2026-11-28: its start, in the local time zone).
        #[arg(long, value_name = "TIME")]
        since: Option<String>,
        /// Only restore points taken at or before TIME: RFC 3339, or a date
        /// (2026-11-28: its end, in the local time zone).
        #[arg(long, value_name = "TIME")]
        until: Option<String>,
    },
    /// Show one restore point.
    Show {
        #[command(flatten)]
        repo: RepoArg,
        /// Restore point: an id (a unique prefix is enough), DISK@latest, DISK@DATE
        /// or VM@DATE (the newest at or before DATE: RFC 3339, or a date meaning its end).
        id: String,
    },
    /// Rebuild a whole VM from a VM-level backup: in a XenServer pool (--sr)
    /// its settings, every disk (new VDIs at the same device positions) and
    /// its network interfaces; for QEMU (--to DIR) every drive's image and
    /// the recorded drive layout.
    RestoreVm(Box<RestoreVmArgs>),
    /// Restore a restore point, byte-exact, to a sparse file, an NBD export or a new VDI.
    Restore(Box<RestoreArgs>),
    /// Serve a restore point read-only over NBD (instant restore).
    Serve {
        #[command(flatten)]
        repo: RepoArg,
        /// Restore point: an id (a unique prefix is enough), DISK@latest, DISK@DATE
        /// or VM@DATE (the newest at or before DATE: RFC 3339, or a date meaning its end).
        id: String,
        /// Where to listen: HOST:PORT or unix:PATH.
        #[arg(long, default_value = "127.0.0.1:10809")]
        listen: String,
        /// Serve with TLS: the certificate chain (PEM)...
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// ...and its private key (PEM).
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        #[command(flatten)]
        limits: ServeLimits,
    },
    /// Single files from a restore point, read from the repository without
    /// a restore or a mount: partitions (MBR, GPT), ext2/3/4, NTFS and FAT.
    #[command(subcommand)]
    Files(FilesCommand),
    /// Tell which blocks differ between two restore points.
    Diff {
        #[command(flatten)]
        repo: RepoArg,
        a: String,
        b: String,
    },
    /// Copy restore points into another repository (an off-site copy): only
    /// the blocks it lacks travel, and what was written is read back.
    Copy {
        /// The repository to copy from: a directory or s3://BUCKET/PREFIX.
        #[arg(long, value_name = "REPO")]
        from: PathBuf,
        /// The repository to copy into (made with `cbtvault init`).
        #[arg(long, value_name = "REPO")]
        to: PathBuf,
        /// Only this disk's restore points.
        #[arg(long)]
        disk: Option<String>,
        /// A file whose first line is the source's passphrase, when it has
        /// its own key (else CBTVAULT_FROM_PASSWORD, else the key that
        /// opens the target).
        #[arg(long, value_name = "FILE", env = "CBTVAULT_FROM_PASSWORD_FILE")]
        from_password_file: Option<PathBuf>,
        /// A key file of the source, when it has its own key.
        #[arg(
            long,
            value_name = "FILE",
            env = "CBTVAULT_FROM_KEY_FILE",
            conflicts_with = "from_password_file"
        )]
        from_key_file: Option<PathBuf>,
        /// Restore points to copy (ids, DISK@DATE, VM@DATE); all when none is given.
        ids: Vec<String>,
    },
    /// Check the repository; with --read-data re-hash every stored block.
    Verify {
        #[command(flatten)]
        repo: RepoArg,
        /// Re-read and re-hash every stored block: passes exactly when every
        /// restore point restores byte-exact.
        #[arg(long)]
        read_data: bool,
        /// Re-read only part of the data: n/m (part n of m; parts 1..m
        /// together cover every pack once, so rotating n re-reads it all over
        /// m runs) or a percentage such as 10%.
        #[arg(long, value_name = "SUBSET", conflicts_with = "read_data")]
        read_data_subset: Option<String>,
    },
    /// Remove restore points by id or by a retention policy (data goes at the next gc).
    Forget(ForgetArgs),
    /// Delete data no restore point references; rewrite mostly-dead packs.
    /// Runs beside backups: what it would delete is condemned first and
    /// deleted once every operation that ran then has ended.
    Gc {
        #[command(flatten)]
        repo: RepoArg,
        /// Seconds to wait for another gc (on any host) or a repair to
        /// finish; backups are not waited for.
        #[arg(long, default_value_t = 0)]
        wait: u64,
        /// Unused space allowed to stay in packs, in percent of the live
        /// data: packs are rewritten (those that free the most first) until
        /// the rest is within it. 0 reclaims everything.
        #[arg(long, default_value_t = 10.0, value_name = "PERCENT")]
        max_unused: f64,
        /// Copy at most this much live data in one run (e.g. 512M, 4G);
        /// the rest is reclaimed by later runs.
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        max_repack: Option<u64>,
        /// Report what would be freed (also under other --max-unused
        /// settings) without changing anything.
        #[arg(long)]
        dry_run: bool,
    },
    /// Rebuild the catalogue from the packs and manifests.
    Repair {
        #[command(flatten)]
        repo: RepoArg,
        /// Seconds to wait for running operations to finish.
        #[arg(long, default_value_t = 0)]
        wait: u64,
    },
    /// Remove what killed QEMU backups left in QEMU (the copy-before-write
    /// filter in the guest's I/O path, the NBD export, the fleece image),
    /// for a job's nodes (--config, --job) or one node (--repo, --disk,
    /// --source qmp:SOCKET, --node). Disks being backed up are left alone.
    Cleanup(CleanupArgs),
    /// Check a configuration file as the daemon would load it: every
    /// mistake with its file, line and reason.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Run every job of the configuration on its schedule, until SIGTERM;
    /// SIGHUP reloads the configuration. Logs on stderr (info by default).
    Daemon {
        /// The configuration file.
        #[arg(long, env = "CBTVAULT_CONFIG")]
        config: PathBuf,
    },
    /// Ask the running daemon to run a job now (POST /run/JOB on its
    /// `[daemon] listen` address).
    Run {
        /// The configuration file the daemon runs.
        #[arg(long, env = "CBTVAULT_CONFIG")]
        config: PathBuf,
        /// The job to run.
        job: String,
    },
    /// The daemon's run history, newest first.
    Runs {
        #[command(flatten)]
        repo: RepoArg,
        /// Only this job.
        #[arg(long)]
        job: Option<String>,
        /// At most this many runs.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Per job its schedule, next run and last outcome per disk; the
    /// repository's size.
    Status {
        /// The configuration file.
        #[arg(long, env = "CBTVAULT_CONFIG")]
        config: PathBuf,
    },
    /// Run a simulated XenServer pool, back its disks up for several nights
    /// with guest writes in between, restore every restore point and check it.
    Demo {
        /// Work directory (a temporary one by default, removed afterwards).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// VMs in the pool (one disk each).
        #[arg(long, default_value_t = 3)]
        vms: usize,
        /// Size of each disk in MiB.
        #[arg(long, default_value_t = 1024)]
        disk_size_mib: u64,
        /// Nights: one full backup, then incrementals.
        #[arg(long, default_value_t = 4)]
        nights: usize,
        /// 64 KiB blocks each guest writes per night.
        #[arg(long, default_value_t = 300)]
        churn: u64,
    },
}

#[derive(ClapArgs, Debug)]
#[command(group(clap::ArgGroup::new("remote").args(["xapi", "vcenter"])))]
pub struct BackupArgs {
    /// The repository directory (from the configuration file with --config).
    #[arg(long, env = "CBTVAULT_REPO")]
    pub repo: Option<PathBuf>,
    /// The disk's name in the repository (file and NBD sources).
    #[arg(long, required_unless_present_any = ["xapi", "vcenter", "config"])]
    pub disk: Option<String>,
    /// What to read: file:PATH (a raw image or block device), qmp:SOCKET with
    /// --node NODE (a QEMU VM or qemu-storage-daemon, via its dirty bitmaps), or an NBD URI:
    /// nbd://HOST[:PORT]/EXPORT, nbds://... (TLS), nbd+unix:///EXPORT?socket=PATH.
    /// TLS options go in the query: tls-certificates=DIR (ca-cert.pem), tls-pin=FILE
    /// (the server's exact certificate), tls-hostname=NAME.
    #[arg(long, required_unless_present_any = ["xapi", "vcenter", "config"])]
    pub source: Option<String>,
    /// The QEMU block node to back up (with --source qmp:SOCKET).
    #[arg(long)]
    pub node: Option<String>,
    /// The unix socket of the NBD server QEMU already runs, if any (with
    /// qmp:SOCKET); otherwise cbtvault starts one beside the QMP socket.
    #[arg(long)]
    pub nbd_socket: Option<PathBuf>,
    #[command(flatten)]
    pub xen: XenArgs,
    #[command(flatten)]
    pub vmware: VcenterArgs,
    /// A configuration file (see docs/config.md); run the job --job from it.
    #[arg(long, requires = "job", conflicts_with_all = ["source", "xapi", "vcenter"])]
    pub config: Option<PathBuf>,
    /// The job to run from --config.
    #[arg(long, requires = "config")]
    pub job: Option<String>,
    /// Take the changed blocks from the QEMU dirty bitmap NAME exported with the
    /// NBD source (the qemu:dirty-bitmap:NAME meta context).
    #[arg(long, conflicts_with = "changed_blocks")]
    pub dirty_bitmap: Option<String>,
    /// NBD connections to open (used when the server allows several).
    #[arg(long, default_value_t = 1)]
    pub connections: usize,
    /// A XenAPI-style base64 bitmap of changed 64 KiB blocks (MSB first), as
    /// VDI.list_changed_blocks returns it; only these blocks are read.
    #[arg(long)]
    pub changed_blocks: Option<PathBuf>,
    /// The restore point the changes are relative to (default: the disk's latest).
    #[arg(long)]
    pub parent: Option<String>,
    /// zstd level for this backup (default: the repository's).
    #[arg(long)]
    pub compression_level: Option<i32>,
    /// Hashing and compression threads (default: all cores).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Read requests in flight.
    #[arg(long, default_value_t = 16)]
    pub inflight: usize,
    /// Largest read request in KiB (a multiple of 64).
    #[arg(long, default_value_t = 1024)]
    pub read_size_kib: usize,
    /// Record the VM this disk belongs to (file and NBD sources): its uuid;
    /// `list --vm` and VM@DATE find the restore point by it.
    #[arg(long, requires_all = ["vm_name", "vm_host"], conflicts_with_all = ["xapi", "config"])]
    pub vm_uuid: Option<String>,
    /// The VM's name (with --vm-uuid).
    #[arg(long, requires = "vm_uuid")]
    pub vm_name: Option<String>,
    /// Where the VM runs: a pool's uuid or a host's name (with --vm-uuid).
    #[arg(long, requires = "vm_uuid")]
    pub vm_host: Option<String>,
    /// The disk's position in the VM, e.g. 0 or xvda (with --vm-uuid).
    #[arg(long, requires = "vm_uuid")]
    pub vm_device: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum FilesCommand {
    /// List a directory: type, mode, owner, size, modification time (UTC),
    /// name. On a partitioned disk the top lists the partitions (p1, p2...)
    /// and paths start with one (p1/etc).
    Ls {
        #[command(flatten)]
        repo: RepoArg,
        /// Restore point: an id (a unique prefix is enough), DISK@latest, DISK@DATE
        /// or VM@DATE.
        id: String,
        /// The directory (or file) to list.
        #[arg(default_value = "/")]
        path: String,
    },
    /// Copy files, directories (with everything below) and symlinks out of
    /// a restore point into DIR, keeping modes, times and (as root)
    /// owners; sparse files stay sparse. Nothing in DIR is overwritten.
    Get {
        #[command(flatten)]
        repo: RepoArg,
        /// Restore point: an id (a unique prefix is enough), DISK@latest, DISK@DATE
        /// or VM@DATE.
        id: String,
        /// Paths in the restore point (p1/etc/hosts on a partitioned disk).
        #[arg(required = true)]
        paths: Vec<String>,
        /// The directory to write into (created if missing).
        #[arg(long, value_name = "DIR")]
        to: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Load FILE and report what is wrong with it, or what it holds.
    Check {
        /// The configuration file.
        file: PathBuf,
    },
}

#[derive(ClapArgs, Debug)]
pub struct CleanupArgs {
    /// A configuration file; clean up after job --job's QEMU nodes.
    #[arg(long, requires = "job", conflicts_with_all = ["source", "node", "disk"])]
    pub config: Option<PathBuf>,
    /// The QEMU job of --config.
    #[arg(long, requires = "config")]
    pub job: Option<String>,
    /// The repository (from the configuration file with --config).
    #[arg(long, env = "CBTVAULT_REPO")]
    pub repo: Option<PathBuf>,
    /// The disk's name in the repository, as given to `backup --disk`.
    #[arg(long, requires = "source")]
    pub disk: Option<String>,
    /// qmp:SOCKET, as given to `backup --source`.
    #[arg(long, requires = "node")]
    pub source: Option<String>,
    /// The QEMU block node, as given to `backup --node`.
    #[arg(long, requires = "source")]
    pub node: Option<String>,
    /// QEMU's NBD socket, as given to `backup --nbd-socket`.
    #[arg(long)]
    pub nbd_socket: Option<PathBuf>,
}

#[derive(ClapArgs, Debug)]
pub struct ForgetArgs {
    #[command(flatten)]
    pub repo: RepoArg,
    /// Restore points to forget (ids or unique prefixes).
    pub ids: Vec<String>,
    /// Apply the policy to this disk only (default: every disk).
    #[arg(long)]
    pub disk: Option<String>,
    #[arg(long)]
    pub keep_last: Option<usize>,
    #[arg(long)]
    pub keep_daily: Option<usize>,
    #[arg(long)]
    pub keep_weekly: Option<usize>,
    #[arg(long)]
    pub keep_monthly: Option<usize>,
    /// Allow forgetting a disk's last restore point (kept otherwise,
    /// whatever the policy or ids say).
    #[arg(long)]
    pub allow_forget_last: bool,
    /// Show what would be forgotten.
    #[arg(long)]
    pub dry_run: bool,
}

/// How to log in to a XenServer / XCP-ng pool.
#[derive(ClapArgs, Debug, Clone)]
pub struct XapiLogin {
    /// The pool master's XenAPI address: https://HOST[:PORT].
    #[arg(long)]
    pub xapi: Option<String>,
    /// XenAPI user.
    #[arg(long, default_value = "root")]
    pub username: String,
    /// A file whose first line is the password.
    #[arg(long, requires = "remote", conflicts_with = "password_env")]
    pub password_file: Option<PathBuf>,
    /// An environment variable holding the password.
    #[arg(long, requires = "remote")]
    pub password_env: Option<String>,
    /// Trust the server's certificate through this CA (PEM).
    #[arg(long, requires = "remote", conflicts_with_all = ["pin", "insecure"])]
    pub ca: Option<PathBuf>,
    /// Trust exactly this certificate (PEM).
    #[arg(long, requires = "remote", conflicts_with = "insecure")]
    pub pin: Option<PathBuf>,
    /// Trust any certificate (logged as a warning).
    #[arg(long, requires = "remote")]
    pub insecure: bool,
    /// Accept an http:// --xapi address. The password and the session then
    /// cross the network in clear: only for a trusted lab network.
    #[arg(long, requires = "xapi")]
    pub allow_insecure_http: bool,
}

/// A vCenter to back up from (the login options are --username,
/// --password-file or --password-env, and --ca, --pin or --insecure).
#[derive(ClapArgs, Debug, Clone)]
pub struct VcenterArgs {
    /// The vCenter's address: https://HOST[:PORT] (back up --vm MOREF or
    /// --fcd ID with --datastore).
    #[arg(long, conflicts_with = "xapi")]
    pub vcenter: Option<String>,
    /// First Class Disks to back up (by id, with --datastore).
    #[arg(long, requires_all = ["vcenter", "datastore"])]
    pub fcd: Vec<String>,
    /// The datastore (moref, datastore-11) of the --fcd disks.
    #[arg(long, requires = "fcd")]
    pub datastore: Option<String>,
    /// Where snapshots' disks are read: an NBD URI with {export} (see
    /// docs/vmware.md).
    #[arg(long, requires = "vcenter")]
    pub nbd_uri: Option<String>,
}

/// A XenServer / XCP-ng pool to back up from.
#[derive(ClapArgs, Debug, Clone)]
pub struct XenArgs {
    #[command(flatten)]
    pub login: XapiLogin,
    /// VDIs to back up (by uuid).
    #[arg(long, requires = "xapi")]
    pub vdi: Vec<String>,
    /// VMs whose disks to back up (by uuid; with --vcenter by moref, vm-42).
    #[arg(long, requires = "remote")]
    pub vm: Vec<String>,
    /// Snapshot all disks of each --vm together (one VM.snapshot), so the
    /// restore points of a VM are consistent with each other.
    #[arg(long, requires = "vm")]
    pub vm_snapshot: bool,
    /// Disks backed up at once.
    #[arg(long, default_value_t = 2)]
    pub parallel: usize,
}

fn parse_size(text: &str) -> Result<u64, String> {
    cbtvault_config::parse_size(text)
}

/// `restore`.
#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("remote").args(["xapi"])))]
pub struct RestoreArgs {
    #[command(flatten)]
    pub repo: RepoArg,
    /// Restore point: an id (a unique prefix is enough), DISK@latest, DISK@DATE
    /// or VM@DATE (the newest at or before DATE: RFC 3339, or a date meaning its end).
    pub id: String,
    /// Where to write the disk: a file path, a writable NBD export URI, or
    /// `xapi` (a new VDI in the pool given with --xapi, on --sr).
    #[arg(long)]
    pub to: String,
    #[command(flatten)]
    pub login: XapiLogin,
    /// With --to xapi: the SR to create the VDI on.
    #[arg(long, conflicts_with = "vdi")]
    pub sr: Option<String>,
    /// With --to xapi --only-changed: the existing VDI to roll back (or
    /// forward); only the blocks that differ are uploaded, as a sparse
    /// VHD.
    #[arg(long, requires = "only_changed", value_name = "UUID")]
    pub vdi: Option<String>,
    /// With --to xapi: take the pool's address and credentials from this
    /// configuration file instead of --xapi.
    #[arg(long, conflicts_with = "xapi")]
    pub config: Option<PathBuf>,
    /// With --config: the pool to restore into (needed when the file has
    /// several).
    #[arg(long, requires = "config")]
    pub pool: Option<String>,
    /// Overwrite an existing file.
    #[arg(long)]
    pub force: bool,
    /// The NBD target reads as zeros already (a new image): skip writing zero blocks.
    #[arg(long)]
    pub target_is_zero: bool,
    /// Roll back an existing disk (a file, block device, NBD export or,
    /// with --to xapi --vdi, a VDI holding another state of this disk):
    /// write only the blocks that differ, found by hashing the target
    /// (several readers at once) or, with --target-state, from the
    /// block maps (for a VDI: the block maps and its CBT).
    #[arg(long, conflicts_with_all = ["force", "target_is_zero"])]
    pub only_changed: bool,
    /// With --only-changed: the restore point the target holds now (it
    /// was restored from it, or backed up as it). The blocks to write
    /// then come from the two block maps and the target is not read;
    /// a target changed since is not noticed.
    #[arg(long, requires = "only_changed", value_name = "ID")]
    pub target_state: Option<String>,
    /// With --target-state: blocks written to the target since it held
    /// that restore point, as a XenAPI-style base64 bitmap (what
    /// VDI.list_changed_blocks returns); they are rewritten too.
    #[arg(long, requires = "target_state", value_name = "FILE")]
    pub target_changed_blocks: Option<PathBuf>,
    /// Threads reading, checking and writing blocks.
    #[arg(long)]
    pub workers: Option<usize>,
}

/// `restore-vm`.
#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("target").args(["sr", "to"]).required(true)))]
pub struct RestoreVmArgs {
    /// The VM-level restore point: VM (its newest), VM@DATE (the newest run
    /// at or before DATE) or the id of any of its disks' restore points.
    pub vm: String,
    /// The configuration holding the pool's address and credentials (and
    /// the repository, unless --repo is given).
    #[arg(long)]
    pub config: PathBuf,
    /// The repository (default: the configuration's).
    #[arg(long, env = "CBTVAULT_REPO")]
    pub repo: Option<PathBuf>,
    /// The pool to restore into (needed when the configuration has several).
    #[arg(long, conflicts_with = "to")]
    pub pool: Option<String>,
    /// A XenServer VM: the SR (uuid) its disks are restored to.
    #[arg(long)]
    pub sr: Option<String>,
    /// A QEMU VM: the directory (new or empty) its images, layout.json and
    /// the qemu-storage-daemon.args and qemu.args fragments are written to.
    #[arg(long, value_name = "DIR")]
    pub to: Option<PathBuf>,
    /// With --to: the images' format.
    #[arg(long, value_enum, default_value_t = ImageFormatArg::Raw, requires = "to")]
    pub format: ImageFormatArg,
    /// The new VM's name (default: the backed-up VM's).
    #[arg(long, conflicts_with = "to")]
    pub name: Option<String>,
    /// Put the VIFs on network OLD (the backed-up VM's network: name, uuid
    /// or bridge) on the pool's network NEW (name, uuid or bridge) instead.
    /// Repeat for several networks.
    #[arg(long = "network-map", value_name = "OLD=NEW", conflicts_with = "to")]
    pub network_map: Vec<String>,
    /// Give the network interfaces new MAC addresses (default: the saved
    /// ones, which clash if the original VM still runs).
    #[arg(long, conflicts_with = "to")]
    pub new_macs: bool,
    /// Start the VM once restored (default: left halted).
    #[arg(long, conflicts_with = "to")]
    pub start: bool,
    /// Print what would be made (VM, disks, sizes, target, names, network
    /// mapping) after checking it, and change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// `restore-vm --format`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageFormatArg {
    Raw,
    Qcow2,
}
