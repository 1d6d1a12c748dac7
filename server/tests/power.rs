//! Power cuts end to end against the real binary: through the control API (`power-cut`,
//! `power-on`, `nbdfault ctl`) and by a rule, each with two libnbd connections open, and the
//! export kept off (refused at the handshake) until a power-on, a trigger or a timeout.
//!
//! The tests check what each connection saw, what storage holds (the control API's `data`,
//! below the fault layer) and what a fresh connection reads afterwards.

mod common;

use std::process::Command;
use std::time::Duration;

use common::control::{Api, Connections, fault_probe, poll};
use common::raw::{self, RawClient};
use common::{NBDFAULT, NBDINFO, PYTHON_NBD, Server, require, run, run_ok};
use serde_json::{Value, json};

const KIB: u64 = 1 << 10;

fn disk() -> (Server, Api) {
    let server = Server::builder().export("disk", "memory:16MiB").with_control().start();
    let api = Api::new(&server);
    (server, api)
}

/// The errno of a result, `None` for success.
fn errno(result: &Value) -> Option<&str> {
    result["errno"].as_str()
}

#[track_caller]
fn bytes(result: &Value) -> Vec<u8> {
    assert_eq!(errno(result), None, "{result}");
    let hex = result["data"].as_str().unwrap_or_else(|| panic!("no data: {result}"));
    (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect()
}

#[track_caller]
fn assert_all(data: &[u8], byte: u8, what: &str) {
    assert!(
        !data.is_empty() && data.iter().all(|&b| b == byte),
        "{what}: expected every byte {byte:#04x}, got {:02x?}",
        &data[..data.len().min(8)]
    );
}

#[test]
fn a_power_cut_through_the_api_drops_both_connections_at_once_and_undoes_every_unflushed_write() {
    require!(PYTHON_NBD, NBDINFO);
    let (server, api) = disk();
    api.set_policy("disk", "volatile_cache: true");
    let mut probe = Connections::start(
        &server.uri("disk"),
        2,
        &[
            "1:write 0 4096 0x41",
            "1:flush",
            "1:write 4096 4096 0x42",
            "2:write 8192 4096 0x43",
            "2:write 12288 4096 0x44 fua",
            // Connections share the device: one sees the other's unflushed write.
            "1:read 8192 4096",
            "pause",
            "1:read 0 4096",
            "2:read 0 4096",
            "1:reconnect",
            "1:read 0 16384",
        ],
    );
    let before = probe.until_pause();
    assert!(before.iter().all(|result| errno(result).is_none()), "{before:#?}");
    assert_all(&bytes(&before[5]), 0x43, "connection 1 reading connection 2's write");
    assert_eq!(api.export("disk")["power"]["connections"], 2);

    let cut = api.post("/v1/exports/disk/power-cut").expect(200).json();
    assert_eq!(cut["dropped_connections"], 2, "{cut}");
    assert_eq!((cut["undone_writes"].as_u64(), cut["undone_bytes"].as_u64()), (Some(2), Some(8 * KIB)), "{cut}");
    assert_eq!(cut["warnings"], json!([]));
    assert_eq!((cut["power"]["on"].as_bool(), cut["power"]["cuts"].as_u64()), (Some(true), Some(1)), "{cut}");

    probe.go_on();
    let after = probe.finish();
    assert!(errno(&after[0]).is_some(), "connection 1 is gone: {:?}", after[0]);
    assert!(errno(&after[1]).is_some(), "connection 2 is gone too: {:?}", after[1]);
    assert_eq!(errno(&after[2]), None, "the power is back: a new connection attaches");
    let seen = bytes(&after[3]);
    assert_all(&seen[..4096], 0x41, "the flushed write");
    assert_all(&seen[4096..12288], 0, "the unflushed writes of both connections");
    assert_all(&seen[12288..], 0x44, "the FUA write");
    assert_eq!(api.data("disk", 0, 16 * KIB), seen, "storage holds what the new connection reads");
    let power = &api.export("disk")["power"];
    assert_eq!((power["on"].as_bool(), power["cuts"].as_u64()), (Some(true), Some(1)), "{power}");
}

#[test]
fn a_rule_that_cuts_power_drops_every_connection_and_the_other_ones_unflushed_write_is_gone() {
    require!(PYTHON_NBD, NBDINFO);
    let (server, api) = disk();
    api.set_policy(
        "disk",
        "rules:\n  - name: crash\n    when: { op: flush, armed_by: crash, nth: 1 }\n    then: { power_cut: true }\n",
    );
    let mut probe = Connections::start(
        &server.uri("disk"),
        2,
        &[
            "1:write 0 4096 0x41",
            "1:flush",
            "2:write 8192 4096 0x51",
            "pause",
            // The flush meets the power cut: the whole device goes, not only this connection.
            "1:flush",
            "2:read 8192 4096",
            "2:reconnect",
            "2:read 8192 4096",
            "2:read 0 4096",
        ],
    );
    let before = probe.until_pause();
    assert!(before.iter().all(|result| errno(result).is_none()), "{before:#?}");
    api.arm("disk", "crash");
    probe.go_on();
    let after = probe.finish();
    assert!(errno(&after[0]).is_some(), "the flush that cut gets no reply: {:?}", after[0]);
    assert!(
        errno(&after[1]).is_some(),
        "the other connection is dropped too, it does not read its write rolled back: {:?}",
        after[1]
    );
    assert_all(&bytes(&after[3]), 0, "the other connection's unflushed write");
    assert_all(&bytes(&after[4]), 0x41, "the flushed write");
    let records = api.faults("disk", 0);
    assert_eq!(records.len(), 1, "{records:#?}");
    assert_eq!((records[0]["outcome"].as_str(), records[0]["reply"].as_str()), (Some("power_cut"), Some("disconnect")));
    assert_eq!(api.export("disk")["power"]["cuts"], 1);
}

/// Whether a fresh client can attach: nbdinfo's exit status and what it said.
fn attach(server: &Server) -> (bool, String) {
    let output = run(NBDINFO.command().arg(server.uri("disk")));
    (output.status.success(), String::from_utf8_lossy(&output.stderr).into_owned())
}

#[test]
fn an_export_kept_off_refuses_clients_at_the_handshake_until_power_on_a_trigger_or_a_timeout() {
    require!(PYTHON_NBD, NBDINFO);
    let (server, api) = disk();
    api.set_policy("disk", "rules: [{ when: { op: write, armed_by: power-on }, then: {} }]");
    assert!(attach(&server).0);

    let cut = api.post("/v1/exports/disk/power-cut?off=true").expect(200).json();
    assert_eq!(cut["power"]["on"], false, "{cut}");
    let (attached, said) = attach(&server);
    assert!(!attached && said.contains("opt_go"), "refused at the handshake: {said}");
    // The refusal is NBD_REP_ERR_UNKNOWN ("export not available"), and says why.
    let mut raw = RawClient::start(server.nbd, raw::FLAG_FIXED_NEWSTYLE | raw::FLAG_NO_ZEROES);
    raw.send_option(raw::OPT_GO, &raw::info_data("disk", &[]));
    let refusal = raw.read_option_reply();
    assert_eq!(refusal.reply_type, raw::REP_ERR_UNKNOWN);
    let message = String::from_utf8_lossy(&refusal.data).into_owned();
    assert!(message.contains("powered off after a power cut") && message.contains("power-on"), "{message}");
    let ops = run(fault_probe("ops").arg(server.uri("disk")).arg("read 0 512"));
    assert!(!ops.status.success(), "libnbd cannot attach either");
    let on = api.post("/v1/exports/disk/power-on").expect(200).json();
    assert_eq!((on["changed"].as_bool(), on["power"]["on"].as_bool()), (Some(true), Some(true)), "{on}");
    assert!(attach(&server).0);
    assert_eq!(api.post("/v1/exports/disk/power-on").expect(200).json()["changed"], false);

    // Off until a trigger is armed.
    let cut = api.post("/v1/exports/disk/power-cut?until=power-on").expect(200).json();
    assert_eq!((cut["power"]["on"].as_bool(), cut["power"]["until"].as_str()), (Some(false), Some("power-on")));
    assert!(!attach(&server).0);
    api.arm("disk", "power-on");
    poll("the export powers on once its trigger is armed", || attach(&server).0.then_some(()));

    // Off for a time.
    let cut = api.post("/v1/exports/disk/power-cut?timeout=1s").expect(200).json();
    assert!(cut["power"]["on_at_ns"].as_u64().is_some(), "{cut}");
    assert!(!attach(&server).0);
    poll("the export powers on once the timeout passes", || attach(&server).0.then_some(()));
    assert_eq!(api.export("disk")["power"]["cuts"], 3);

    for bad in ["timeout=5", "timeout=0", "until=a%20b", "offf=true"] {
        let answer = api.post(&format!("/v1/exports/disk/power-cut?{bad}"));
        assert_eq!(answer.status, 400, "{bad}: {}", answer.text());
    }
    assert_eq!(api.export("disk")["power"]["cuts"], 3, "refused cuts change nothing");
}

#[test]
fn a_rule_can_keep_the_export_off_until_a_trigger_and_a_cut_without_a_journal_says_so() {
    require!(PYTHON_NBD, NBDINFO);
    let (server, api) = disk();
    api.set_policy(
        "disk",
        "rules:\n  - name: crash\n    when: { op: flush, armed_by: crash }\n    then: { power_cut: { until: power-on } }\n",
    );
    api.arm("disk", "crash");
    let results = common::control::ops(&server.uri("disk"), &["write 0 4096 1", "flush"]);
    assert!(results[1].errno.is_some(), "the flush meets the power cut");
    poll("the cut is logged", || (!api.faults("disk", 0).is_empty()).then_some(()));
    let record = &api.faults("disk", 0)[0];
    assert_eq!(record["power_off"], json!({"until": "power-on"}), "{record}");
    assert!(!attach(&server).0, "off until power-on is armed");
    api.disarm("disk", "crash");
    api.arm("disk", "power-on");
    poll("the trigger powers the export on", || attach(&server).0.then_some(()));
    assert!(api.data("disk", 0, 4096).iter().all(|&b| b == 0), "the unflushed write is undone");

    // Without a policy that keeps the journal, the answer warns that nothing was undone.
    api.clear_policy("disk");
    let cut = api.post("/v1/exports/disk/power-cut").expect(200).json();
    let warnings = cut["warnings"].as_array().unwrap();
    assert_eq!(warnings.len(), 1, "{cut}");
    assert!(warnings[0].as_str().unwrap().contains("keeps no journal of unflushed writes"), "{cut}");
}

#[test]
fn ctl_power_cut_and_power_on_print_the_answer_and_strict_fails_on_a_cut_that_undoes_nothing() {
    require!(PYTHON_NBD, NBDINFO);
    let (server, api) = disk();
    let ctl = || {
        let mut command = Command::new(NBDFAULT);
        command.env_remove("NBDFAULT_CONTROL_URL").env_remove("NBDFAULT_CONTROL_TOKEN");
        command.args(["ctl", "--url", api.base()]);
        command
    };
    api.set_policy("disk", "volatile_cache: true");
    let answer = common::json(&run_ok(ctl().args(["power-cut", "disk", "--off"])));
    assert_eq!((answer["power"]["on"].as_bool(), answer["dropped_connections"].as_u64()), (Some(false), Some(0)));
    assert!(!attach(&server).0);
    let answer = common::json(&run_ok(ctl().args(["power-on", "disk"])));
    assert_eq!(answer["changed"], true);
    assert!(attach(&server).0);
    let answer = common::json(&run_ok(ctl().args(["power-cut", "disk", "--timeout", "200ms"])));
    assert!(answer["power"]["on_at_ns"].is_u64(), "{answer}");
    poll("back after 200 ms", || attach(&server).0.then_some(()));

    api.clear_policy("disk");
    let output = run(ctl().args(["--strict", "power-cut", "disk"]));
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("keeps no journal"), "{output:?}");
    std::thread::sleep(Duration::from_millis(10));
    assert_eq!(api.export("disk")["power"]["cuts"], 3);
}

/// A client that dies with requests waiting for the I/O threads (its machine went) leaves their
/// I/O to run when a thread is free; a power cut right after must wait for that I/O before it
/// undoes the unflushed writes, or the dead client's WRITE_ZEROES land on the "power-cut" disk
/// after the undo. The I/O threads are made busy first by another export's large WRITE_ZEROES,
/// so the dead client's requests are still queued when the cut comes.
#[test]
fn a_power_cut_right_after_a_client_died_with_writes_queued_leaves_exactly_the_flushed_contents() {
    require!(PYTHON_NBD);
    const REGION: u64 = 64 * KIB;
    const BUSY: u64 = 128 << 20;
    // In tmpfs: the undo of a small range is done at once on the async thread, and WRITE_ZEROES
    // with NO_HOLE cannot be done in place, so the busy export really writes its zeros.
    let dir = tempfile::tempdir_in("/dev/shm").expect("a directory in /dev/shm (tmpfs)");
    let (disk, busy) = (dir.path().join("disk.img"), dir.path().join("busy.img"));
    common::empty_image(&disk, 1 << 20);
    common::empty_image(&busy, BUSY);
    let server = Server::builder()
        .export("disk", format!("file:{}", disk.display()))
        .export("busy", format!("file:{}", busy.display()))
        .with_control()
        .start();
    let api = Api::new(&server);
    api.set_policy("disk", "volatile_cache: true");
    for round in 1..=3u8 {
        let flushed = format!("write 0 {REGION} {round}");
        let results = common::control::ops(&server.uri("disk"), &[flushed.as_str(), "flush"]);
        assert!(results.iter().all(|result| result.ok()), "{results:?}");
        let output = run_ok(fault_probe("abandon").args([
            server.uri("disk"),
            server.uri("busy"),
            BUSY.to_string(),
            (REGION / (4 * KIB)).to_string(),
            api.base().to_string(),
            "POST /v1/exports/disk/power-cut".to_string(),
        ]));
        let report = common::json(&output);
        assert_eq!(report["busy_errors"], json!({}), "{report}");
        // The dead connection may be gone before the cut: then it is not counted as dropped.
        // Most or all of the WRITE_ZEROES reached the server before the reset.
        assert!(report["call"]["undone_writes"].as_u64() >= Some(1), "nothing to undo: {report}");
        let stored = api.data("disk", 0, REGION);
        assert!(
            stored.iter().all(|&b| b == round),
            "round {round}: storage must hold exactly the flushed write after the cut; byte {:?} differs ({report})",
            stored.iter().position(|&b| b != round)
        );
    }
}

/// A policy swap is no power event: unflushed writes stay undoable while the new policy keeps
/// the journal. A policy without a volatile cache drops the journal (the answer warns), so a cut
/// after it undoes nothing written before; DELETE drops it too.
#[test]
fn unflushed_writes_stay_undoable_across_a_policy_swap_only_while_the_new_policy_keeps_the_journal() {
    require!(PYTHON_NBD);
    let (server, api) = disk();
    let uri = server.uri("disk");
    let unflushed = || api.export("disk")["unflushed_bytes"].as_u64();
    let warnings =
        |answer: &Value| answer["warnings"].as_array().unwrap().iter().map(|w| w.to_string()).collect::<Vec<_>>();
    api.set_policy("disk", "volatile_cache: true");
    let results = common::control::ops(&uri, &["write 0 4096 0x41"]);
    assert!(results[0].ok());
    assert_eq!(unflushed(), Some(4096));
    let kept = api.set_policy(
        "disk",
        "rules: [{ name: crash, when: { op: flush, armed_by: crash }, then: { power_cut: true } }]",
    );
    assert!(!warnings(&kept).iter().any(|w| w.contains("journal")), "{kept}");
    assert_eq!(unflushed(), Some(4096), "a swap to another volatile cache keeps the journal");

    let dropped = api.set_policy("disk", "rules: [{ when: { op: trim }, then: { error: EIO } }]");
    let said = warnings(&dropped);
    assert!(said.iter().any(|w| w.contains("keeps no journal") && w.contains("1 writes (4096 bytes)")), "{dropped}");
    assert_eq!(unflushed(), Some(0));
    api.set_policy("disk", "volatile_cache: true");
    assert!(common::control::ops(&uri, &["write 8192 4096 0x42"])[0].ok());
    let cut = api.post("/v1/exports/disk/power-cut").expect(200).json();
    assert_eq!(cut["undone_writes"], 1, "only the write after the swap back: {cut}");
    let stored = api.data("disk", 0, 12288);
    assert!(stored[..4096].iter().all(|&b| b == 0x41), "written before the journal was dropped: survives");
    assert!(stored[8192..].iter().all(|&b| b == 0), "written after: undone");

    assert!(common::control::ops(&uri, &["write 0 4096 0x43"])[0].ok());
    assert_eq!(unflushed(), Some(4096));
    api.clear_policy("disk");
    assert_eq!(unflushed(), Some(0), "DELETE drops the journal too");
}
