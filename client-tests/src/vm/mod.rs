//! The VM harness: fetch a Debian kernel, build an initramfs with this (statically linked) binary,
//! start `nbdfault serve`, boot qemu, attach with the real nbd-client, run the suite inside, and
//! collect its report.

pub mod check;
pub mod debian;
pub mod guest;
pub mod initramfs;
pub mod kernel;
pub mod modules;
pub mod power_cut;
pub mod qemu;
pub mod server;
pub mod tls;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Args;

use crate::report::{Report, extract_reports};
use crate::story;

/// Arguments of `vm`.
#[derive(Args, Debug)]
pub struct VmArgs {
    /// The client kernel: a version prefix such as 5.10, 6.1, 6.12 or 7 (the newest Debian build
    /// wins), a suite (sid: its newest kernel), a Debian package name, or the path of a kernel
    /// .deb you built. Repeat it to run several kernels one after the other and print what
    /// changed between each and the next (see `diff`).
    #[arg(long, required_unless_present = "vmlinuz", conflicts_with = "vmlinuz")]
    pub kernel: Vec<String>,
    /// Boot this kernel image instead of a Debian package (see --modules).
    #[arg(long)]
    pub vmlinuz: Option<PathBuf>,
    /// With --vmlinuz: the lib/modules/RELEASE directory holding nbd, xfs, ext4, virtio_net (and btrfs)
    /// (leave out when they are built in).
    #[arg(long, requires = "vmlinuz")]
    pub modules: Option<PathBuf>,
    /// xfs, ext4, btrfs, a comma-separated list of them, or all.
    #[arg(long, default_value = "all")]
    pub fs: String,
    /// Only these scenarios (comma-separated; see `scenarios`).
    #[arg(long, default_value = "")]
    pub only: String,
    /// Where the JSON reports (one per filesystem) are written.
    #[arg(long, default_value = "nbdfault-results")]
    pub out: PathBuf,
    #[command(flatten)]
    pub common: Common,
    /// The nbdfault server binary (default: next to this program in the target directory, then PATH).
    #[arg(long)]
    pub server: Option<PathBuf>,
    /// The statically linked nbdfault-client-tests to put in the guest (default: this program if
    /// it is static, else its static build in the target directory).
    #[arg(long)]
    pub guest_binary: Option<PathBuf>,
    /// The nbd-client to put in the guest.
    #[arg(long, default_value = "nbd-client")]
    pub nbd_client: String,
    /// How long the server holds each error reply, in milliseconds.
    #[arg(long, default_value_t = 50)]
    pub delay_ms: u64,
    /// Give up on the guest after this many seconds.
    #[arg(long, default_value_t = 900)]
    pub timeout: u64,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 1024)]
    pub memory: u32,
    /// Guest CPUs.
    #[arg(long, default_value_t = 2)]
    pub cpus: u32,
    /// The qemu binary.
    #[arg(long, default_value = "qemu-system-x86_64")]
    pub qemu: PathBuf,
    /// After the table, tell in plain words what the overwrite scenario saw (the demo).
    #[arg(long)]
    pub story: bool,
    /// Print the URL of the server's live page (open it in a browser on this host to see the
    /// oracle's writes and failures land), and keep the server, and so the page, up after the
    /// guest is done until Enter or Ctrl-C.
    #[arg(long)]
    pub watch: bool,
}

/// Options shared by `vm` and `kernel`.
#[derive(Args, Debug)]
pub struct Common {
    /// Cache for package lists, kernels and packages (default: $NBDFAULT_CACHE, else
    /// $XDG_CACHE_HOME/nbdfault, else ~/.cache/nbdfault).
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// Download Debian's package lists again even if the cached ones are less than a day old.
    #[arg(long)]
    pub refresh: bool,
    /// The Debian archive to fetch from.
    #[arg(long, env = "NBDFAULT_DEBIAN_MIRROR", default_value = "http://deb.debian.org")]
    pub mirror: String,
}

/// Arguments of `kernel`.
#[derive(Args, Debug)]
pub struct KernelArgs {
    /// A version prefix (5.10, 6.1, 6.12, 7), a Debian package name, or a .deb path.
    #[arg(long)]
    pub kernel: String,
    /// Also unpack every package of the kernel into this directory, as installed, and print the
    /// image and modules directory to give `vm --vmlinuz --modules`.
    #[arg(long)]
    pub extract: Option<PathBuf>,
    #[command(flatten)]
    pub common: Common,
}

/// Arguments of `kernels`.
#[derive(Args, Debug)]
pub struct KernelsArgs {
    /// Only versions starting with this prefix (6.12, 7).
    #[arg(long)]
    pub version: Option<String>,
    #[command(flatten)]
    pub common: Common,
}

/// The cache directory.
pub fn cache_dir(explicit: Option<&Path>) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_path_buf();
    }
    if let Some(p) = std::env::var_os("NBDFAULT_CACHE") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(p).join("nbdfault");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".cache/nbdfault")
}

/// Holds an exclusive lock on the cache so two harnesses do not unpack the same kernel at once.
pub(crate) struct CacheLock {
    _file: std::fs::File,
}

impl CacheLock {
    pub(crate) fn take(cache: &Path) -> std::io::Result<CacheLock> {
        use std::os::unix::io::AsRawFd;
        std::fs::create_dir_all(cache)?;
        let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(cache.join(".lock"))?;
        // SAFETY: flock on a descriptor we own; released when the file closes.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(CacheLock { _file: file })
    }
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_sig: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Ctrl-C reaches qemu and the server (same process group) and ends them; this process only
/// notes it, so it can go on to stop what is left and remove its temporary files. A handler,
/// not SIG_IGN, so the children (which exec) keep the default action.
pub(crate) fn catch_interrupts() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_interrupt as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_interrupt as *const () as libc::sighandler_t);
    }
}

/// Prints progress with the time since start.
pub(crate) struct Progress(pub(crate) Instant);

impl Progress {
    pub(crate) fn say(&self, text: &str) {
        eprintln!("[{:6.1}s] {text}", self.0.elapsed().as_secs_f64());
    }
}

/// A directory removed, with everything in it, when dropped.
pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    pub(crate) fn new() -> std::io::Result<TempDir> {
        let base = std::env::temp_dir().join(format!(
            "nbdfault-vm-{}-{}",
            std::process::id(),
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
        ));
        std::fs::create_dir_all(&base)?;
        Ok(TempDir(base))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// True when `path` is an ELF executable without a program interpreter (statically linked).
pub fn is_static_executable(path: &Path) -> std::io::Result<bool> {
    let data = std::fs::read(path)?;
    if data.len() < 64 || &data[0..4] != b"\x7fELF" || data[4] != 2 {
        return Ok(false);
    }
    let u16_at = |at: usize| u16::from_le_bytes([data[at], data[at + 1]]) as usize;
    let phoff = u64::from_le_bytes(data[0x20..0x28].try_into().unwrap_or_default()) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    const PT_INTERP: u32 = 3;
    for i in 0..phnum {
        let at = phoff + i * phentsize;
        let Some(kind) = data.get(at..at + 4) else { return Ok(false) };
        if u32::from_le_bytes(kind.try_into().unwrap_or_default()) == PT_INTERP {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Directories where sibling build outputs may be: this program's own directory, and for a
/// `target/TRIPLE/PROFILE` build also `target/PROFILE` (and the reverse).
fn sibling_dirs() -> Vec<PathBuf> {
    let Ok(exe) = std::env::current_exe() else { return Vec::new() };
    let Some(dir) = exe.parent().map(Path::to_path_buf) else { return Vec::new() };
    let mut dirs = vec![dir.clone()];
    if let (Some(profile), Some(parent)) = (dir.file_name(), dir.parent()) {
        if parent.file_name().is_some_and(|n| n == "x86_64-unknown-linux-gnu")
            && let Some(target) = parent.parent()
        {
            dirs.push(target.join(profile));
        } else {
            dirs.push(parent.join("x86_64-unknown-linux-gnu").join(profile));
        }
    }
    dirs
}

pub(crate) fn find_server(explicit: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(p) = explicit {
        return if p.is_file() { Ok(p.to_path_buf()) } else { Err(format!("--server {}: no such file", p.display())) };
    }
    sibling_dirs()
        .into_iter()
        .map(|d| d.join("nbdfault"))
        .find(|p| p.is_file())
        .or_else(|| initramfs::find_tool("nbdfault").ok())
        .ok_or_else(|| "cannot find the nbdfault server: build it in the same target directory (cargo build -p nbdfault) or pass --server PATH".to_string())
}

pub(crate) fn find_guest_binary(explicit: Option<&Path>) -> Result<PathBuf, String> {
    let static_hint = "build it with RUSTFLAGS='-C target-feature=+crt-static' cargo build -p nbdfault-client-tests --target x86_64-unknown-linux-gnu (or pass --guest-binary PATH)";
    if let Some(p) = explicit {
        return match is_static_executable(p) {
            Ok(true) => Ok(p.to_path_buf()),
            Ok(false) => Err(format!("{} is not a statically linked executable: {static_hint}", p.display())),
            Err(e) => Err(format!("{}: {e}", p.display())),
        };
    }
    sibling_dirs()
        .into_iter()
        .map(|d| d.join("nbdfault-client-tests"))
        .find(|p| is_static_executable(p).unwrap_or(false))
        .ok_or_else(|| format!("no statically linked nbdfault-client-tests for the guest: {static_hint}"))
}

/// `kernel`: fetch and unpack, print what the cache holds.
pub fn kernel_main(args: KernelArgs) -> Result<ExitCode, String> {
    let progress = Progress(Instant::now());
    let cache = cache_dir(args.common.cache.as_deref());
    let _lock = CacheLock::take(&cache).map_err(|e| format!("cannot lock the cache {}: {e}", cache.display()))?;
    let k = kernel::prepare(&cache, &args.common.mirror, &args.kernel, args.common.refresh, &mut |s| progress.say(s))
        .map_err(|e| e.to_string())?;
    println!(
        "kernel {} ({})",
        k.release,
        k.package.as_ref().map(|p| format!("{} {}", p.name, p.version)).unwrap_or_default()
    );
    println!("image {}", k.vmlinuz.display());
    println!("modules {}", k.modules.iter().map(|m| m.name.as_str()).collect::<Vec<_>>().join(" "));
    if let Some(dest) = &args.extract {
        let Some(package) = &k.package else { return Err("no Debian package to extract".into()) };
        let apt = debian::Apt::new(&cache.join("apt"), &args.common.mirror);
        let parts = kernel::fetch_parts(&apt, package, &args.kernel, args.common.refresh, &mut |s| progress.say(s))
            .map_err(|e| e.to_string())?;
        let (vmlinuz, modules) = kernel::extract(&parts, dest).map_err(|e| e.to_string())?;
        for (part, deb) in &parts {
            println!("deb {} {} {}", part.name, part.version, deb.display());
        }
        println!("vmlinuz {}", vmlinuz.display());
        println!("modules-dir {}", modules.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// `kernels`: every Debian kernel the harness can boot, newest first.
pub fn kernels_main(args: KernelsArgs) -> Result<ExitCode, String> {
    let progress = Progress(Instant::now());
    let cache = cache_dir(args.common.cache.as_deref());
    let _lock = CacheLock::take(&cache).map_err(|e| format!("cannot lock the cache {}: {e}", cache.display()))?;
    let apt = debian::Apt::new(&cache.join("apt"), &args.common.mirror);
    if apt.update(args.common.refresh).map_err(|e| e.to_string())? {
        progress.say("package lists downloaded");
    }
    let mut offers = apt.kernel_packages().map_err(|e| e.to_string())?;
    offers.retain(|o| {
        args.version.as_deref().is_none_or(|v| o.package.upstream().is_some_and(|k| debian::version_matches(v, k)))
    });
    offers.sort_by(debian::newest_first);
    print!("{}", kernels_table(&offers));
    Ok(ExitCode::SUCCESS)
}

/// The `kernels` listing: version, Debian version, package, suites.
pub fn kernels_table(offers: &[debian::Offer]) -> String {
    let rows: Vec<[String; 4]> = offers
        .iter()
        .map(|o| {
            [
                o.package.upstream().map(|v| v.to_string()).unwrap_or_else(|| "?".into()),
                o.package.version.clone(),
                o.package.name.clone(),
                o.suites.join(", "),
            ]
        })
        .collect();
    let header = ["VERSION", "DEBIAN VERSION", "PACKAGE", "SUITE"].map(String::from);
    let widths: Vec<usize> =
        (0..3).map(|i| rows.iter().chain([&header]).map(|r| r[i].len()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in [&header].into_iter().chain(rows.iter()) {
        out.push_str(&format!(
            "{:<w0$}  {:<w1$}  {:<w2$}  {}\n",
            row[0],
            row[1],
            row[2],
            row[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2]
        ));
    }
    out
}

/// `vm`: everything, start to finish.
pub fn main(args: VmArgs) -> Result<ExitCode, String> {
    let progress = Progress(Instant::now());
    catch_interrupts();
    let filesystems = crate::suite::fs::parse_list(&args.fs)?;
    qemu::check_available(&args.qemu)?;
    let server_binary = find_server(args.server.as_deref())?;
    let guest_binary = find_guest_binary(args.guest_binary.as_deref())?;
    let cache = cache_dir(args.common.cache.as_deref());

    let binaries = Binaries { server: server_binary, guest: guest_binary };
    if let Some(vmlinuz) = &args.vmlinuz {
        let kernel = kernel::custom(vmlinuz, args.modules.as_deref()).map_err(|e| e.to_string())?;
        let (reports, failing) = boot_and_run(&args, &kernel, &binaries, &filesystems, &progress)?;
        return Ok(finish(&args, &[reports], failing, &progress));
    }
    let mut runs = Vec::new();
    let mut failing = 0;
    for spec in &args.kernel {
        let kernel = {
            let _lock =
                CacheLock::take(&cache).map_err(|e| format!("cannot lock the cache {}: {e}", cache.display()))?;
            kernel::prepare(&cache, &args.common.mirror, spec, args.common.refresh, &mut |s| progress.say(s))
                .map_err(|e| e.to_string())?
        };
        let (reports, f) = boot_and_run(&args, &kernel, &binaries, &filesystems, &progress)?;
        failing += f;
        runs.push(reports);
    }
    Ok(finish(&args, &runs, failing, &progress))
}

/// The programs the harness starts: the server on the host, the suite in the guest.
struct Binaries {
    server: PathBuf,
    guest: PathBuf,
}

/// After every kernel: the story, the diff between consecutive kernels, the summary and the exit
/// status.
fn finish(args: &VmArgs, runs: &[Vec<Report>], failing: usize, progress: &Progress) -> ExitCode {
    if args.story {
        for reports in runs {
            println!("{}", story::tell(reports));
        }
    }
    for pair in runs.windows(2) {
        match crate::diff::changes(&pair[0], &pair[1]) {
            Ok(changes) => print!("{}", crate::diff::render(&pair[0], &pair[1], &changes, crate::diff::columns())),
            Err(e) => progress.say(&format!("no diff: {e}")),
        }
    }
    let all: Vec<Report> = runs.iter().flatten().cloned().collect();
    summarize(&all, failing, progress);
    if failing > 0 { ExitCode::from(1) } else { ExitCode::SUCCESS }
}

/// Boots one kernel and runs the suite in it; returns its reports (also written to `--out`) and
/// how many checks fail the run.
fn boot_and_run(
    args: &VmArgs,
    kernel: &kernel::PreparedKernel,
    binaries: &Binaries,
    filesystems: &[crate::suite::Fs],
    progress: &Progress,
) -> Result<(Vec<Report>, usize), String> {
    let fs_list = filesystems.iter().map(|f| f.name()).collect::<Vec<_>>().join(",");
    let (server_binary, guest_binary) = (&binaries.server, &binaries.guest);
    progress.say(&format!("kernel {} with {} modules", kernel.release, kernel.modules.len()));

    let temp = TempDir::new().map_err(|e| format!("cannot make a temporary directory: {e}"))?;
    let tool = |name: &str| initramfs::find_tool(name).map_err(|e| e.to_string());
    // mkfs only for the filesystems asked for: btrfs-progs need not be installed for XFS and ext4.
    let mut programs =
        vec![("/bin/busybox".to_string(), tool("busybox")?), ("/sbin/nbd-client".to_string(), tool(&args.nbd_client)?)];
    for fs in filesystems {
        programs.push((format!("/sbin/{}", fs.mkfs_program()), tool(fs.mkfs_program())?));
    }
    let programs: Vec<(&str, PathBuf)> = programs.iter().map(|(g, h)| (g.as_str(), h.clone())).collect();
    let files: Vec<(&str, PathBuf)> =
        [("/etc/mke2fs.conf", PathBuf::from("/etc/mke2fs.conf"))].into_iter().filter(|(_, p)| p.is_file()).collect();
    let init = guest::init_script();
    let guest_binary = initramfs::without_debug_info(guest_binary, &temp.0);
    let archive = initramfs::build(&initramfs::Contents {
        init_script: &init,
        guest_binary: &guest_binary,
        modules: &kernel.modules,
        programs: &programs,
        files: &files,
    })
    .map_err(|e| e.to_string())?;
    let initrd = temp.0.join("initramfs.cpio");
    std::fs::write(&initrd, &archive).map_err(|e| format!("cannot write the initramfs: {e}"))?;
    progress.say(&format!("initramfs built ({} MiB, guest binary {})", archive.len() >> 20, guest_binary.display()));

    // One export per filesystem, each a copy-on-write overlay over an image the host's mkfs made:
    // resetting the export restores a fresh filesystem at once, so scenarios skip mkfs.
    let mut exports = Vec::new();
    for fs in filesystems {
        let image = temp.0.join(format!("{fs}.img"));
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(1 << 30))
            .map_err(|e| format!("cannot make {}: {e}", image.display()))?;
        fs.make_image(&image).map_err(|e| format!("cannot make the {fs} base image: {e}"))?;
        exports.push((fs.name().to_string(), format!("overlay:{}", image.display())));
    }
    progress.say(&format!("base images made with the host's mkfs for {fs_list}"));
    let server =
        server::Server::start(server_binary, &exports, &temp.0.join("server.log")).map_err(|e| e.to_string())?;
    progress
        .say(&format!("nbdfault serve ready: NBD on {}, control API on {}", server.ready.nbd, server.ready.control));
    if args.watch {
        let first = filesystems.first().map(|fs| fs.name()).unwrap_or_default();
        progress.say(&format!("live page: {}", live_page_url(server.ready.control, first)));
    }

    let params = guest::GuestParams {
        nbd_port: server.ready.nbd.port(),
        control_port: server.ready.control.port(),
        filesystems: fs_list.clone(),
        only: args.only.clone(),
        delay_ms: args.delay_ms,
        package: kernel.package.as_ref().map(|p| p.name.clone()).unwrap_or_default(),
    };
    let config = qemu::QemuConfig {
        qemu: args.qemu.clone(),
        kernel: kernel.vmlinuz.clone(),
        initrd,
        append: guest::kernel_command_line(&params),
        memory_mib: args.memory,
        cpus: args.cpus,
        report: temp.0.join("report.serial"),
        console_log: temp.0.join("console.log"),
        timeout: Duration::from_secs(args.timeout),
    };
    progress.say(&format!("booting {} under qemu (TCG) for {fs_list}", kernel.release));
    let outcome = qemu::run(&config, &mut |line| {
        if let Some(text) = guest::progress_text(line) {
            progress.say(&format!("  guest: {text}"));
        }
    })
    .map_err(|e| format!("cannot run qemu: {e}"))?;
    if args.watch && !INTERRUPTED.load(Ordering::SeqCst) {
        progress.say(&format!(
            "the guest is done; the live page stays up at {} until Enter or Ctrl-C",
            live_page_url(server.ready.control, filesystems.first().map(|fs| fs.name()).unwrap_or_default())
        ));
        wait_for_enter_or_interrupt();
    }
    let server_exit = server.stop();
    if INTERRUPTED.load(Ordering::SeqCst) {
        return Err("interrupted: qemu and the server were stopped and the temporary files removed".into());
    }
    progress.say(&format!(
        "guest finished in {:.0} s{}",
        outcome.elapsed.as_secs_f64(),
        if outcome.timed_out { " (TIMED OUT, killed)" } else { "" }
    ));

    let serial = std::fs::read(&config.report).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
    std::fs::create_dir_all(&args.out).map_err(|e| format!("cannot create {}: {e}", args.out.display()))?;
    let reports = match extract_reports(&serial) {
        Ok(r) if !r.is_empty() => r,
        result => {
            let why = result.err().unwrap_or_else(|| "the report is empty".into());
            let kept = args.out.join(format!("{}-console.log", kernel.label()));
            let _ = std::fs::copy(&config.console_log, &kept);
            let _ = std::fs::copy(temp.0.join("server.log"), args.out.join(format!("{}-server.log", kernel.label())));
            let console = std::fs::read_to_string(&config.console_log).unwrap_or_default();
            let tail: Vec<&str> = console.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect();
            return Err(format!(
                "no report from the guest: {why}\nlast console lines:\n{}\n(console and server logs kept in {})",
                tail.join("\n"),
                args.out.display()
            ));
        }
    };
    let mut failing = 0;
    for report in &reports {
        let path = args.out.join(format!("{}-{}.json", kernel.label(), report.fs));
        std::fs::write(&path, serde_json::to_string_pretty(report).map_err(|e| e.to_string())?)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        println!("{}", report.table());
        progress.say(&format!("report written to {}", path.display()));
        failing += report.failures().count();
    }
    if let Some(status) = server_exit
        && !status.success()
    {
        progress.say(&format!("note: nbdfault serve exited with {status} after SIGTERM"));
    }
    Ok((reports, failing))
}

/// The server's live page for one export (the control API listens on the host's loopback).
fn live_page_url(control: std::net::SocketAddr, export: &str) -> String {
    format!("http://{control}/?export={export}")
}

/// Returns when a line (or the end) comes on stdin, or on Ctrl-C.
fn wait_for_enter_or_interrupt() {
    let (done, waiting) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
        let _ = done.send(());
    });
    while !INTERRUPTED.load(Ordering::SeqCst) {
        if waiting.recv_timeout(Duration::from_millis(200)) != Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
            return;
        }
    }
}

fn summarize(reports: &[Report], failing: usize, progress: &Progress) {
    if failing == 0 {
        progress.say("no guaranteed invariant was violated and every check ran");
        return;
    }
    for report in reports {
        for c in report.failures() {
            progress.say(&format!(
                "FAILED {} {} {}: {}",
                report.fs,
                c.id,
                c.verdict.word(),
                c.reason.as_deref().unwrap_or("")
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_table_lines_up_version_package_and_suites() {
        let offer = |name: &str, version: &str, suites: &[&str]| debian::Offer {
            package: debian::KernelPackage { name: name.into(), version: version.into() },
            suites: suites.iter().map(|s| s.to_string()).collect(),
        };
        let table = kernels_table(&[
            offer("linux-image-7.2.13+deb14-amd64", "7.2.13-1", &["sid"]),
            offer("linux-image-6.1.0-56-amd64", "6.1.192-2", &["bookworm", "bookworm-security"]),
        ]);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("VERSION  DEBIAN VERSION  PACKAGE"), "{table}");
        assert!(lines[1].starts_with("7.2.13   7.2.13-1        linux-image-7.2.13+deb14-amd64  sid"), "{table}");
        assert!(lines[2].ends_with("linux-image-6.1.0-56-amd64      bookworm, bookworm-security"), "{table}");
    }

    #[test]
    fn the_live_page_url_names_the_export() {
        let control = "127.0.0.1:41707".parse().unwrap();
        assert_eq!(live_page_url(control, "xfs"), "http://127.0.0.1:41707/?export=xfs");
    }

    #[test]
    fn cache_dir_prefers_the_flag_then_the_environment() {
        assert_eq!(cache_dir(Some(Path::new("/x"))), PathBuf::from("/x"));
        let default = cache_dir(None);
        assert!(default.ends_with("nbdfault"), "{}", default.display());
    }

    #[test]
    fn dynamic_programs_are_not_static() {
        assert!(!is_static_executable(&initramfs::find_tool("ls").unwrap()).unwrap());
        assert!(!is_static_executable(Path::new("/etc/passwd")).unwrap());
    }

    #[test]
    fn busybox_static_is_static() {
        nbdfault_testing::require!(nbdfault_testing::BUSYBOX);
        let busybox = initramfs::find_tool("busybox").expect("install busybox-static");
        assert!(is_static_executable(&busybox).unwrap());
    }
}
