//! `vm-power-cut`: a power cut as the kernel meets it. Boots a Debian kernel in qemu, attaches
//! `/dev/nbd0` with two connections (`nbd-client -C 2`) to an export whose policy says
//! `volatile_cache: true`, writes one block and flushes it, writes another without a flush, and
//! then the host cuts the export's power through the control API (`?off=true`). Then:
//!
//! * the server must say it dropped both connections and undid the unflushed write;
//! * the device must fail its I/O in the guest (with two connections the kernel would move I/O to
//!   a live one: failing I/O shows both died);
//! * a new `nbd-client` must be refused while the export is off;
//! * after `power-on`, a new attachment with two connections must read the flushed block back
//!   and zeros where the unflushed one was.
//!
//! The guest reports each step on the console; the host acts on them (the cut, the power-on)
//! and judges.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use nbdfault_control_client::{Client, PowerOff};

use super::guest::HOST_FROM_GUEST;
use super::{CacheLock, Common, Progress, TempDir, cache_dir, find_guest_binary, find_server, initramfs, kernel, qemu};

/// Bytes of each block the guest writes.
const BLOCK: usize = 64 << 10;
/// Where the second, unflushed block goes, in blocks.
const UNFLUSHED_AT: usize = 16;
/// Where the guest finds its blocks.
const GUEST_DIR: &str = "/etc/nbdfault";
/// Console lines of the check start with this.
const MARK: &str = "power-cut: ";

/// Arguments of `vm-power-cut`.
#[derive(Args, Debug)]
pub struct PowerCutArgs {
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

/// The guest's `/init` for the check.
pub fn init_script() -> String {
    let attach = format!("nbd-client {HOST_FROM_GUEST} \"$port\" /dev/nbd0 -N disk -b 4096 -C 2 -t 10");
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
say() {{ echo "nbdfault-init: {MARK}$*"; }}
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
if ! {attach} >/tmp/attach.log 2>&1; then
    say "attach failed: $(tail -n 2 /tmp/attach.log | tr '\n' ' ')"
    poweroff -f
fi
say "attached with 2 connections"
dd if={GUEST_DIR}/flushed.bin of=/dev/nbd0 bs={BLOCK} count=1 oflag=direct conv=fsync 2>/dev/null || say "flushed write failed"
dd if={GUEST_DIR}/unflushed.bin of=/dev/nbd0 bs={BLOCK} count=1 seek={UNFLUSHED_AT} oflag=direct 2>/dev/null || say "unflushed write failed"
say "ready for the power cut"
i=0
while dd if=/dev/nbd0 of=/dev/null bs=4096 count=1 iflag=direct 2>/dev/null; do
    i=$((i + 1))
    if [ $i -gt 300 ]; then say "device I/O still works 60 s later"; break; fi
    sleep 0.2
done
[ $i -le 300 ] && say "device I/O fails after the cut"
say "kernel: $(dmesg | grep -c 'nbd0: Receive control failed') of nbd0's connections saw the server close"
dmesg | grep -i 'nbd0' | tail -n 4 | while read -r line; do say "kernel: $line"; done
if nbd-client {HOST_FROM_GUEST} "$port" /dev/nbd1 -N disk -b 4096 -C 2 -t 10 >/tmp/off.log 2>&1; then
    say "attached while off"
    nbd-client -d /dev/nbd1 >/dev/null 2>&1
else
    say "refused while off: $(grep -v '^Exiting' /tmp/off.log | tail -n 2 | tr '\n' ' ')"
fi
nbd-client -d /dev/nbd0 >/dev/null 2>&1
i=0
until {attach} >/tmp/on.log 2>&1; do
    i=$((i + 1))
    if [ $i -gt 60 ]; then say "no attach after power-on: $(tail -n 1 /tmp/on.log)"; poweroff -f; fi
    sleep 1
done
say "attached again with 2 connections"
echo 3 >/proc/sys/vm/drop_caches
dd if=/dev/nbd0 of=/tmp/flushed.back bs={BLOCK} count=1 iflag=direct 2>/dev/null || say "read failed"
dd if=/dev/nbd0 of=/tmp/unflushed.back bs={BLOCK} count=1 skip={UNFLUSHED_AT} iflag=direct 2>/dev/null || say "read failed"
if cmp {GUEST_DIR}/flushed.bin /tmp/flushed.back >/dev/null; then say "flushed block survived"; else say "flushed block lost"; fi
if cmp {GUEST_DIR}/zeros.bin /tmp/unflushed.back >/dev/null; then say "unflushed block gone"; else say "unflushed block survived"; fi
nbd-client -d /dev/nbd0 >/dev/null 2>&1
say "done"
poweroff -f
"#
    )
}

/// What the guest reported, and what the host saw of the server at each step.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Findings {
    pub lines: Vec<String>,
    /// Connections the server counted before the cut, and after the new attachment.
    pub connections_before: Option<u64>,
    pub connections_after: Option<u64>,
    /// The power-cut answer: connections dropped, writes undone.
    pub dropped: Option<u64>,
    pub undone_writes: Option<u64>,
    /// Whether the export was off between the cut and the power-on.
    pub off: Option<bool>,
    /// Errors of the host's own API calls.
    pub api_errors: Vec<String>,
}

impl Findings {
    fn has(&self, prefix: &str) -> bool {
        self.lines.iter().any(|line| line.starts_with(prefix))
    }

    /// Every failed expectation, in words.
    pub fn problems(&self) -> Vec<String> {
        let mut problems: Vec<String> = self.api_errors.iter().map(|e| format!("control API: {e}")).collect();
        let mut expect = |ok: bool, problem: &str| {
            if !ok {
                problems.push(problem.to_string());
            }
        };
        expect(self.has("attached with 2 connections"), "nbd-client -C 2 could not attach");
        expect(self.connections_before == Some(2), "the server did not count 2 connections before the cut");
        expect(self.dropped == Some(2), "the power cut did not drop both connections");
        expect(self.undone_writes.is_some_and(|n| n >= 1), "the power cut undid no unflushed write");
        expect(self.off == Some(true), "the export was not off after the cut");
        expect(self.has("device I/O fails after the cut"), "the guest's device kept working after the cut");
        expect(self.has("refused while off"), "a new nbd-client attached while the export was off");
        expect(self.has("attached again with 2 connections"), "nbd-client could not attach after power-on");
        expect(self.connections_after == Some(2), "the server did not count 2 connections after power-on");
        expect(self.has("flushed block survived"), "the flushed block did not survive the power cut");
        expect(self.has("unflushed block gone"), "the unflushed block survived the power cut");
        expect(self.has("done"), "the guest did not finish the check");
        problems
    }
}

/// The host's part, step by step as the guest's console lines come.
fn act(client: &Client, line: &str, findings: &mut Findings) {
    let mut note = |result: Result<(), nbdfault_control_client::Error>| {
        if let Err(e) = result {
            findings.api_errors.push(e.to_string());
        }
    };
    if line.starts_with("ready for the power cut") {
        let connections = client.export("disk").map(|e| e.power.map_or(0, |p| p.connections));
        match connections {
            Ok(n) => findings.connections_before = Some(n),
            Err(e) => note(Err(e)),
        }
        match client.power_cut("disk", &PowerOff { off: true, ..PowerOff::default() }) {
            Ok(answer) => {
                findings.dropped = Some(answer.dropped_connections);
                findings.undone_writes = Some(answer.undone_writes);
                findings.off = Some(!answer.power.on);
            }
            Err(e) => note(Err(e)),
        }
    } else if line.starts_with("refused while off") || line.starts_with("attached while off") {
        note(client.power_on("disk").map(drop));
    } else if line.starts_with("attached again") {
        // The kernel opened both connections before nbd-client returned.
        let connections = client.export("disk").map(|e| e.power.map_or(0, |p| p.connections));
        match connections {
            Ok(n) => findings.connections_after = Some(n),
            Err(e) => note(Err(e)),
        }
    }
}

/// `vm-power-cut`: everything, start to finish.
pub fn main(args: PowerCutArgs) -> Result<ExitCode, String> {
    let progress = Progress(Instant::now());
    super::catch_interrupts();
    qemu::check_available(&args.qemu)?;
    let server_binary = find_server(args.server.as_deref())?;
    let guest_binary = find_guest_binary(args.guest_binary.as_deref())?;
    let cache = cache_dir(args.common.cache.as_deref());
    let kernel = {
        let _lock = CacheLock::take(&cache).map_err(|e| format!("cannot lock the cache {}: {e}", cache.display()))?;
        kernel::prepare(&cache, &args.common.mirror, &args.kernel, args.common.refresh, &mut |s| progress.say(s))
            .map_err(|e| e.to_string())?
    };
    let temp = TempDir::new().map_err(|e| format!("cannot make a temporary directory: {e}"))?;
    let block = |seed: u64| -> Vec<u8> {
        (0..BLOCK as u64).map(|i| (i.wrapping_add(seed).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8 | 1).collect()
    };
    let blocks = [("flushed.bin", block(1)), ("unflushed.bin", block(2)), ("zeros.bin", vec![0; BLOCK])];
    for (name, data) in &blocks {
        std::fs::write(temp.0.join(name), data).map_err(|e| format!("cannot write {name}: {e}"))?;
    }
    let tool = |name: &str| initramfs::find_tool(name).map_err(|e| e.to_string());
    let programs = [("/bin/busybox", tool("busybox")?), ("/sbin/nbd-client", tool("nbd-client")?)];
    let guest_paths: Vec<String> = blocks.iter().map(|(name, _)| format!("{GUEST_DIR}/{name}")).collect();
    let files: Vec<(&str, PathBuf)> =
        guest_paths.iter().map(String::as_str).zip(blocks.iter().map(|(name, _)| temp.0.join(name))).collect();
    let init = init_script();
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

    let policy = temp.0.join("volatile-cache.yaml");
    std::fs::write(&policy, "volatile_cache: true\n").map_err(|e| format!("cannot write the policy: {e}"))?;
    let policy_arg = format!("disk={}", policy.display());
    let exports = [("disk".to_string(), "memory:64MiB".to_string())];
    let log = temp.0.join("server.log");
    let server = super::server::Server::start_with(&server_binary, &exports, &["--policy", &policy_arg], &log)
        .map_err(|e| e.to_string())?;
    let client =
        Client::new(&format!("http://{}", server.ready.control), None).map_err(|e| format!("control API: {e}"))?;
    progress.say(&format!("nbdfault serve on {}, export disk with volatile_cache: true", server.ready.nbd));

    let config = qemu::QemuConfig {
        qemu: args.qemu.clone(),
        kernel: kernel.vmlinuz.clone(),
        initrd,
        append: format!("console=ttyS0 panic=-1 loglevel=4 NBDFAULT_NBD_PORT={}", server.ready.nbd.port()),
        memory_mib: 512,
        cpus: 2,
        report: temp.0.join("report.serial"),
        console_log: temp.0.join("console.log"),
        timeout: Duration::from_secs(args.timeout),
    };
    progress.say(&format!("booting {} under qemu (TCG)", kernel.release));
    let mut findings = Findings::default();
    let outcome = qemu::run(&config, &mut |line| {
        if let Some(text) = super::guest::progress_text(line).and_then(|t| t.strip_prefix(MARK)) {
            let text = text.trim().to_string();
            progress.say(&format!("  guest: {text}"));
            act(&client, &text, &mut findings);
            findings.lines.push(text);
        }
    })
    .map_err(|e| format!("cannot run qemu: {e}"))?;
    let _ = server.stop();
    progress.say(&format!("guest finished in {:.0} s", outcome.elapsed.as_secs_f64()));
    progress.say(&format!(
        "server: {:?} connections before the cut, dropped {:?}, undid {:?} writes, off {:?}; {:?} connections after power-on",
        findings.connections_before,
        findings.dropped,
        findings.undone_writes,
        findings.off,
        findings.connections_after
    ));

    let problems = findings.problems();
    if problems.is_empty() {
        progress.say(
            "power cut with nbd-client -C 2: both connections dropped, the device failed, clients refused while \
             off, flushed data kept and unflushed data gone after power-on",
        );
        return Ok(ExitCode::SUCCESS);
    }
    for problem in &problems {
        progress.say(&format!("FAILED: {problem}"));
    }
    let console = std::fs::read_to_string(&config.console_log).unwrap_or_default();
    let tail: Vec<&str> = console.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect();
    let server_log = std::fs::read_to_string(&log).unwrap_or_default();
    eprintln!("last console lines:\n{}\nserver log:\n{server_log}", tail.join("\n"));
    Ok(ExitCode::from(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_attaches_with_two_connections_writes_then_waits_for_the_cut() {
        let init = init_script();
        assert!(init.contains("-N disk -b 4096 -C 2 -t 10"));
        let flushed = init.find("oflag=direct conv=fsync").expect("a flushed write");
        let unflushed = init.find("seek=16 oflag=direct 2>").expect("an unflushed write");
        let ready = init.find("ready for the power cut").unwrap();
        assert!(flushed < unflushed && unflushed < ready);
        assert!(init.find("refused while off").unwrap() < init.find("attached again").unwrap());
        assert!(init.trim_end().ends_with("poweroff -f"));
    }

    #[test]
    fn every_missing_step_is_a_problem() {
        let lines = [
            "attached with 2 connections",
            "ready for the power cut",
            "device I/O fails after the cut",
            "refused while off: x",
            "attached again with 2 connections",
            "flushed block survived",
            "unflushed block gone",
            "done",
        ];
        let good = Findings {
            lines: lines.iter().map(|l| l.to_string()).collect(),
            connections_before: Some(2),
            connections_after: Some(2),
            dropped: Some(2),
            undone_writes: Some(1),
            off: Some(true),
            api_errors: Vec::new(),
        };
        assert!(good.problems().is_empty(), "{:?}", good.problems());
        let one_dropped = Findings { dropped: Some(1), ..good };
        assert_eq!(one_dropped.problems(), ["the power cut did not drop both connections"]);
        assert_eq!(Findings::default().problems().len(), 12);
    }
}
