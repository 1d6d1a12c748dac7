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

use clap::Args;
use nbdfault_control_client::{Client, PowerOff};

use super::check::{Check, CheckArgs, GUEST_DIR, init_preamble};
use super::guest::HOST_FROM_GUEST;

/// Bytes of each block the guest writes.
const BLOCK: usize = 64 << 10;
/// Where the second, unflushed block goes, in blocks.
const UNFLUSHED_AT: usize = 16;
/// Console lines of the check start with this.
const MARK: &str = "power-cut: ";

/// Arguments of `vm-power-cut`.
#[derive(Args, Debug)]
pub struct PowerCutArgs {
    #[command(flatten)]
    pub check: CheckArgs,
}

/// The guest's `/init` for the check.
pub fn init_script() -> String {
    let attach = format!("nbd-client {HOST_FROM_GUEST} \"$port\" /dev/nbd0 -N disk -b 4096 -C 2 -t 10");
    let steps = format!(
        r#"if ! {attach} >/tmp/attach.log 2>&1; then
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
    );
    init_preamble(MARK) + &steps
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
    let check = Check::prepare(&args.check)?;
    let temp = &check.temp.0;
    let block = |seed: u64| -> Vec<u8> {
        (0..BLOCK as u64).map(|i| (i.wrapping_add(seed).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8 | 1).collect()
    };
    let blocks = [("flushed.bin", block(1)), ("unflushed.bin", block(2)), ("zeros.bin", vec![0; BLOCK])];
    for (name, data) in &blocks {
        std::fs::write(temp.join(name), data).map_err(|e| format!("cannot write {name}: {e}"))?;
    }
    let guest_paths: Vec<String> = blocks.iter().map(|(name, _)| format!("{GUEST_DIR}/{name}")).collect();
    let files: Vec<(&str, PathBuf)> =
        guest_paths.iter().map(String::as_str).zip(blocks.iter().map(|(name, _)| temp.join(name))).collect();

    let policy = temp.join("volatile-cache.yaml");
    std::fs::write(&policy, "volatile_cache: true\n").map_err(|e| format!("cannot write the policy: {e}"))?;
    let policy_arg = format!("disk={}", policy.display());
    let exports = [("disk".to_string(), "memory:64MiB".to_string())];
    let log = temp.join("server.log");
    let server = super::server::Server::start_with(&check.server_binary, &exports, &["--policy", &policy_arg], &log)
        .map_err(|e| e.to_string())?;
    let client =
        Client::new(&format!("http://{}", server.ready.control), None).map_err(|e| format!("control API: {e}"))?;
    check.progress.say(&format!("nbdfault serve on {}, export disk with volatile_cache: true", server.ready.nbd));

    let mut findings = Findings::default();
    check.boot(&init_script(), &files, server.ready.nbd.port(), MARK, &mut |text| {
        act(&client, text, &mut findings);
        findings.lines.push(text.to_string());
    })?;
    let _ = server.stop();
    check.progress.say(&format!(
        "server: {:?} connections before the cut, dropped {:?}, undid {:?} writes, off {:?}; {:?} connections after power-on",
        findings.connections_before,
        findings.dropped,
        findings.undone_writes,
        findings.off,
        findings.connections_after
    ));
    let passed = "power cut with nbd-client -C 2: both connections dropped, the device failed, clients refused while \
                  off, flushed data kept and unflushed data gone after power-on";
    let server_log = std::fs::read_to_string(&log).unwrap_or_default();
    Ok(check.verdict(&findings.problems(), passed, &server_log))
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
