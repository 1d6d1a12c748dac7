//! What the small single-purpose VM checks (`vm-tls`, `vm-power-cut`) share: their arguments,
//! the kernel and binaries they need, a guest `/init` that brings up the network and reports on
//! the console, the boot itself, and the failure report. Each check adds only its own steps and
//! its own judgement.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;

use super::guest::HOST_FROM_GUEST;
use super::{CacheLock, Common, Progress, TempDir, cache_dir, find_guest_binary, find_server, initramfs, kernel, qemu};

/// Where a check's guest finds the files the host gives it.
pub const GUEST_DIR: &str = "/etc/nbdfault";

/// Arguments every small VM check takes.
#[derive(Args, Debug)]
pub struct CheckArgs {
    /// The client kernel: a version prefix such as 6.1 or 6.12, a package name, or a .deb path.
    #[arg(long)]
    pub kernel: String,
    #[command(flatten)]
    pub common: Common,
    /// The nbdfault server binary (default: next to this program, then PATH).
    #[arg(long)]
    pub server: Option<PathBuf>,
    /// The statically linked nbdfault-client-tests to put in the guest.
    #[arg(long)]
    pub guest_binary: Option<PathBuf>,
    /// Give up on the guest after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// The qemu binary.
    #[arg(long, default_value = "qemu-system-x86_64")]
    pub qemu: PathBuf,
}

/// The start of a check's `/init`: busybox, the kernel file systems, the modules, the network to
/// the host, a `say` that prints `MARK` lines for the host, and `$port`, the server's NBD port.
/// The check's own steps follow; it ends with `poweroff -f`.
pub fn init_preamble(mark: &str) -> String {
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
say() {{ echo "nbdfault-init: {mark}$*"; }}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
for m in /lib/modules/*.ko; do
    insmod "$m" 2>/dev/null
done
ip link set lo up
ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via {HOST_FROM_GUEST} || say "no network"
port="$NBDFAULT_NBD_PORT"
"#
    )
}

/// A check being run: the kernel it boots, the binaries, a temporary directory for the run.
pub(crate) struct Check {
    pub(crate) progress: Progress,
    pub(crate) server_binary: PathBuf,
    pub(crate) temp: TempDir,
    guest_binary: PathBuf,
    kernel: kernel::PreparedKernel,
    qemu: PathBuf,
    timeout: Duration,
    console_log: PathBuf,
}

impl Check {
    /// Finds qemu and the binaries and prepares the kernel (downloaded once into the cache).
    pub fn prepare(args: &CheckArgs) -> Result<Check, String> {
        let progress = Progress(Instant::now());
        super::catch_interrupts();
        qemu::check_available(&args.qemu)?;
        let server_binary = find_server(args.server.as_deref())?;
        let guest_binary = find_guest_binary(args.guest_binary.as_deref())?;
        let cache = cache_dir(args.common.cache.as_deref());
        let kernel = {
            let _lock =
                CacheLock::take(&cache).map_err(|e| format!("cannot lock the cache {}: {e}", cache.display()))?;
            kernel::prepare(&cache, &args.common.mirror, &args.kernel, args.common.refresh, &mut |s| progress.say(s))
                .map_err(|e| e.to_string())?
        };
        let temp = TempDir::new().map_err(|e| format!("cannot make a temporary directory: {e}"))?;
        let console_log = temp.0.join("console.log");
        Ok(Check {
            progress,
            server_binary,
            temp,
            guest_binary,
            kernel,
            qemu: args.qemu.clone(),
            timeout: Duration::from_secs(args.timeout),
            console_log,
        })
    }

    /// Boots the kernel with `init` as `/init`, busybox and nbd-client, and `files` (guest path,
    /// host path), the guest dialling the server at `nbd_port`. Calls `on_report` with the text
    /// of each console line `say` printed (without `mark`), as it comes.
    pub fn boot(
        &self,
        init: &str,
        files: &[(&str, PathBuf)],
        nbd_port: u16,
        mark: &str,
        on_report: &mut dyn FnMut(&str),
    ) -> Result<(), String> {
        let tool = |name: &str| initramfs::find_tool(name).map_err(|e| e.to_string());
        let programs = [("/bin/busybox", tool("busybox")?), ("/sbin/nbd-client", tool("nbd-client")?)];
        let archive = initramfs::build(&initramfs::Contents {
            init_script: init,
            guest_binary: &self.guest_binary,
            modules: &self.kernel.modules,
            programs: &programs,
            files,
        })
        .map_err(|e| e.to_string())?;
        let initrd = self.temp.0.join("initramfs.cpio");
        std::fs::write(&initrd, &archive).map_err(|e| format!("cannot write the initramfs: {e}"))?;
        let config = qemu::QemuConfig {
            qemu: self.qemu.clone(),
            kernel: self.kernel.vmlinuz.clone(),
            initrd,
            append: format!("console=ttyS0 panic=-1 loglevel=4 NBDFAULT_NBD_PORT={nbd_port}"),
            memory_mib: 512,
            cpus: 2,
            report: self.temp.0.join("report.serial"),
            console_log: self.console_log.clone(),
            timeout: self.timeout,
        };
        self.progress.say(&format!("booting {} under qemu (TCG)", self.kernel.release));
        let outcome = qemu::run(&config, &mut |line| {
            if let Some(text) = super::guest::progress_text(line).and_then(|t| t.strip_prefix(mark)) {
                let text = text.trim();
                self.progress.say(&format!("  guest: {text}"));
                on_report(text);
            }
        })
        .map_err(|e| format!("cannot run qemu: {e}"))?;
        self.progress.say(&format!("guest finished in {:.0} s", outcome.elapsed.as_secs_f64()));
        Ok(())
    }

    /// The verdict: success with `passed` said, or each problem, the console's last lines and the
    /// server's log, and failure.
    pub fn verdict(&self, problems: &[String], passed: &str, server_log: &str) -> ExitCode {
        if problems.is_empty() {
            self.progress.say(passed);
            return ExitCode::SUCCESS;
        }
        for problem in problems {
            self.progress.say(&format!("FAILED: {problem}"));
        }
        let console = std::fs::read_to_string(&self.console_log).unwrap_or_default();
        let lines: Vec<&str> = console.lines().collect();
        let tail = &lines[lines.len().saturating_sub(30)..];
        eprintln!("last console lines:\n{}\nserver log:\n{server_log}", tail.join("\n"));
        ExitCode::from(1)
    }
}
