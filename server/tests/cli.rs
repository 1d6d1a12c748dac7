//! The command line and configuration file, the defaults a first run gets, errors that say what
//! to change (never a panic), graceful shutdown, and what file and overlay exports leave on disk.

mod common;

use std::os::unix::fs::FileExt;
use std::process::Command;
use std::time::Duration;

use common::raw::*;
use common::{CHATTR, IP, NBDINFO, NSENTER, QEMU_IO, UNSHARE, require};
use common::{NBDFAULT, Server, assert_same_bytes, json, run, run_ok, run_within};

const MIB: u64 = 1 << 20;

// ---- defaults and configuration --------------------------------------------------------------

/// `nbdfault serve` with no flags listens on the fixed port 127.0.0.1:10809. To never collide
/// with anything else on the machine (other tests, a developer's server), it runs in a network
/// namespace of its own, and nbdinfo joins that namespace.
#[test]
fn serve_with_no_flags_serves_a_1_gib_default_export_on_127_0_0_1_port_10809() {
    require!(IP, NBDINFO, NSENTER, UNSHARE);
    let probe = run(Command::new("unshare").args(["--net", "true"]));
    assert!(
        probe.status.success(),
        "this test runs the server in a network namespace, which needs root (as in CI) or user namespaces: {}",
        String::from_utf8_lossy(&probe.stderr)
    );
    let server = Server::builder()
        .default_addresses()
        .wrapped_in(["unshare", "--net", "sh", "-c", r#"ip link set lo up && exec "$0" "$@""#])
        .start();
    assert_eq!(server.nbd.to_string(), "127.0.0.1:10809");
    if let Some(control) = server.control {
        assert_eq!(control.to_string(), "127.0.0.1:10810", "the control API's default address");
    }
    let namespace = format!("--net=/proc/{}/ns/net", server.pid());
    let mut nbdinfo = Command::new("nsenter");
    nbdinfo.arg(&namespace).args(["nbdinfo", "--json", "nbd://127.0.0.1:10809"]);
    let info = json(&run_ok(&mut nbdinfo));
    let export = &info["exports"][0];
    assert_eq!(export["export-name"], "", "{info}");
    assert_eq!(export["export-size"], 1u64 << 30, "{info}");
    assert_eq!(export["is_read_only"], false, "{info}");
    // Loopback only: the same port on another address of the namespace is not served.
    let mut other = Command::new("nsenter");
    other.arg(&namespace).args(["nbdinfo", "nbd://127.0.0.2:10809"]);
    assert!(!run(&mut other).status.success(), "only 127.0.0.1 is served by default");
}

#[test]
fn a_yaml_config_file_sets_addresses_exports_and_limits_with_paths_relative_to_it() {
    require!(NBDINFO);
    let dir = tempfile::tempdir().unwrap();
    common::empty_image(&dir.path().join("disk.img"), 4 * MIB);
    let config = dir.path().join("nbdfault.yaml");
    std::fs::write(
        &config,
        "# A configuration a user would write.\n\
         listen: ['127.0.0.1:0']\n\
         control: 'off'\n\
         limits:\n\
         \x20 handshake_timeout: 1s\n\
         \x20 max_connections: 3\n\
         \x20 max_in_flight: 64MiB\n\
         exports:\n\
         \x20 - name: disk\n\
         \x20   description: a file next to the configuration\n\
         \x20   storage: disk.img\n\
         \x20 - name: scratch\n\
         \x20   storage: memory:8MiB\n\
         \x20   read_only: true\n",
    )
    .unwrap();
    let server = Server::builder().default_addresses().arg("--config").arg(&config).start();
    assert_eq!(server.control, None, "control: 'off'");
    let listed = json(&run_ok(NBDINFO.command().args(["--list", "--json"]).arg(server.uri(""))));
    let exports = listed["exports"].as_array().unwrap();
    let find = |name: &str| exports.iter().find(|e| e["export-name"] == name).unwrap_or_else(|| panic!("{listed}"));
    assert_eq!(find("disk")["export-size"], 4 * MIB);
    assert_eq!(find("disk")["description"], "a file next to the configuration");
    assert_eq!(find("disk")["is_read_only"], false);
    assert_eq!(find("scratch")["export-size"], 8 * MIB);
    assert_eq!(find("scratch")["is_read_only"], true);
    assert_eq!(exports.len(), 2);

    // The file's limits apply: the handshake timeout closes an idle client.
    let mut idle = RawClient::connect(server.nbd);
    idle.read_greeting();
    assert!(idle.closed_by_server(), "handshake_timeout: 1s");

    // The relative path is the file beside the configuration.
    let (mut client, _) = RawClient::attach(server.nbd, "disk", false);
    client.write_ok(1, 1000, b"relative");
    let mut on_disk = [0u8; 8];
    std::fs::File::open(dir.path().join("disk.img")).unwrap().read_exact_at(&mut on_disk, 1000).unwrap();
    assert_eq!(&on_disk, b"relative");
}

#[test]
fn flags_override_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("nbdfault.yaml");
    std::fs::write(
        &config,
        "listen: ['127.0.0.1:1']\ncontrol: 127.0.0.1:2\nexports:\n  - {name: disk, storage: 'memory:1MiB'}\n  - {name: keep, storage: 'memory:2MiB'}\n",
    )
    .unwrap();
    // The harness adds --listen 127.0.0.1:0 and --no-control, which must win over the file.
    let server = Server::builder()
        .arg("--config")
        .arg(&config)
        .export("disk", "memory:3MiB")
        .args(["--read-only", "keep"])
        .start();
    assert_eq!(server.control, None);
    let (_, disk) = RawClient::attach(server.nbd, "disk", false);
    assert_eq!(disk.size, 3 * MIB, "--export replaces the file's export of the same name");
    let (_, keep) = RawClient::attach(server.nbd, "keep", false);
    assert_eq!((keep.size, keep.flags & READ_ONLY != 0), (2 * MIB, true));
}

#[test]
fn several_listen_addresses_including_ipv6_serve_the_same_exports() {
    let server = Server::builder().export("disk", "memory:1MiB").args(["--listen", "[::1]:0"]).start();
    let ready_v6 = server.ready["nbd"][1].as_str().expect("a second address in the ready line").to_string();
    let v6: std::net::SocketAddr = ready_v6.parse().unwrap();
    assert!(v6.is_ipv6() && v6.ip().is_loopback() && v6.port() != 0, "{ready_v6}");
    let (mut over_v4, _) = RawClient::attach(server.nbd, "disk", false);
    let (mut over_v6, _) = RawClient::attach(v6, "disk", false);
    over_v4.write_ok(1, 0, b"one export");
    assert_eq!(over_v6.read_ok(2, 0, 10), b"one export");
}

#[test]
fn quiet_and_verbose_flags_set_how_much_is_logged() {
    let quiet = Server::builder().export("disk", "memory:1MiB").arg("-q").start();
    let (client, _) = RawClient::attach(quiet.nbd, "disk", false);
    client.disconnect();
    let verbose = Server::builder().export("disk", "memory:1MiB").arg("-v").start();
    let (client, _) = RawClient::attach(verbose.nbd, "disk", false);
    client.disconnect();
    std::thread::sleep(Duration::from_millis(100));
    assert!(!quiet.stderr().contains("INFO"), "-q logs warnings only:\n{}", quiet.stderr());
    let log = verbose.stderr();
    assert!(log.contains("DEBUG") && log.contains("client attached"), "-v logs debug messages:\n{log}");
}

/// Runs `nbdfault ARGS` expecting it to refuse them: a non-zero exit, before listening, with
/// `expected` in its message and no panic.
#[track_caller]
fn refused(args: &[&str], expected: &str) {
    refused_command(Command::new(NBDFAULT).args(args), expected);
}

#[track_caller]
fn refused_command(command: &mut Command, expected: &str) {
    command.env_remove("RUST_LOG").env_remove("NBDFAULT_CONFIG").env_remove("NBDFAULT_LISTEN");
    let shown = common::show(command);
    let output = run_within(command, Duration::from_secs(10));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{shown} must fail; it exited with {}\n{stderr}", output.status);
    assert_eq!(output.status.code(), Some(2), "{shown}: usage and configuration errors exit 2\n{stderr}");
    assert!(!stdout.contains("ready"), "{shown} must not get ready: {stdout}");
    assert!(!stderr.contains("panicked"), "{shown} panicked:\n{stderr}");
    assert!(stderr.contains(expected), "{shown}: the message should contain {expected:?}:\n{stderr}");
}

#[test]
fn bad_flags_are_refused_before_listening_with_what_to_change() {
    refused(&[], "Usage");
    refused(&["serve", "--bogus"], "--bogus");
    refused(&["frobnicate"], "frobnicate");
    refused(&["serve", "--export", "disk"], "NAME=VALUE");
    refused(&["serve", "--export", "disk=memory:1MB"], "MiB");
    refused(&["serve", "--export", "disk=memory"], "memory:1GiB");
    refused(&["serve", "--export", "disk=memory:0"], "above 0");
    refused(&["serve", "--export", "disk=overlay:"], "base image");
    refused(&["serve", "--export", "@default=memory:1MiB"], "starts with @, which the control API keeps");
    refused(&["serve", "--listen", "localhost"], "IP:PORT");
    refused(&["serve", "--listen", "127.0.0.1:0", "--control", "nowhere"], "IP:PORT");
    refused(&["serve", "--listen", "127.0.0.1:10999", "--control", "127.0.0.1:10999"], "another port");
    refused(&["serve", "--handshake-timeout", "5"], "no unit");
    refused(&["serve", "--max-connections", "0"], "at least 1");
    refused(&["serve", "--max-connections", "-1"], "'-1'");
    refused(&["serve", "--max-in-flight", "1MiB"], "32 MiB");
    refused(&["serve", "--read-only", "nope"], "no such export");
    refused(&["serve", "--listen", "127.0.0.1:0", "--control-token", ""], "token is empty");
    refused(&["serve", "--listen", "127.0.0.1:0", "--control-token-file", "/nonexistent/token"], "token file");
    refused(&["serve", "-v", "-q"], "cannot be used with");
}

#[test]
fn no_control_wins_over_the_control_address_from_the_environment() {
    // A container image sets NBDFAULT_CONTROL; `--no-control` on its command line must still work.
    // The harness passes --no-control when no control API is asked for.
    let server = Server::builder().env("NBDFAULT_CONTROL", "127.0.0.1:0").start();
    assert_eq!(server.control, None);
}

#[test]
fn an_export_given_twice_on_the_command_line_is_refused() {
    let args = ["serve", "--listen", "127.0.0.1:0", "--no-control", "--export", "a=memory:1MiB", "--export"];
    refused(&[&args[..], &["a=memory:2MiB"]].concat(), "\"a\"");
}

#[test]
fn a_listen_address_in_use_is_refused_with_a_hint() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    refused(&["serve", "--no-control", "--listen", &address], "another process uses that port");
    refused(&["serve", "--no-control", "--listen", &address], "choose another port with --listen");
}

#[test]
fn a_control_address_in_use_is_refused_with_a_hint_naming_the_control_flag() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    let args = ["serve", "--listen", "127.0.0.1:0", "--control", &address];
    refused(&args, "cannot start the control API");
    refused(&args, "choose another port with --control, or turn the control API off with --no-control");
}

#[test]
fn unusable_image_files_are_refused_before_listening_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.img");
    let spec = format!("disk={}", missing.display());
    refused(&["serve", "--no-control", "--listen", "127.0.0.1:0", "--export", &spec], "truncate -s");
    refused(&["serve", "--no-control", "--listen", "127.0.0.1:0", "--export", &spec], "missing.img");
    let spec = format!("disk=overlay:{}", missing.display());
    refused(&["serve", "--no-control", "--listen", "127.0.0.1:0", "--export", &spec], "no such file");
    let spec = format!("disk={}", dir.path().display());
    refused(&["serve", "--no-control", "--listen", "127.0.0.1:0", "--export", &spec], "is a directory");
    let empty = dir.path().join("empty.img");
    std::fs::File::create(&empty).unwrap();
    let spec = format!("disk=file:{}", empty.display());
    refused(&["serve", "--no-control", "--listen", "127.0.0.1:0", "--export", &spec], "empty");
}

#[test]
fn bad_config_files_are_refused_with_their_location_and_what_to_change() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.yaml");
    refused(&["serve", "--config", &missing.to_string_lossy()], "cannot read the configuration file");
    let cases = [
        ("syntax.yaml", "exports:\n  - name: [unclosed\n", "line 2"),
        ("field.yaml", "exports: []\nlisn: ['127.0.0.1:0']\n", "unknown field `lisn`"),
        ("export-field.yaml", "exports:\n  - {name: a, storage: 'memory:1MiB', size: 3}\n", "unknown field `size`"),
        (
            "twice.yaml",
            "exports:\n  - {name: a, storage: 'memory:1MiB'}\n  - {name: a, storage: 'memory:1MiB'}\n",
            "defined twice",
        ),
        ("listen.yaml", "listen: []\n", "listen is empty"),
        ("size.yaml", "exports:\n  - {name: a, storage: 'memory:lots'}\n", "export \"a\""),
        ("limit.yaml", "limits:\n  handshake_timeout: 0s\n", "above 0"),
        ("type.yaml", "limits:\n  max_connections: many\n", "max_connections"),
        ("missing-image.yaml", "exports:\n  - {name: a, storage: nothere.img}\n", "truncate -s"),
        ("at.yaml", "exports:\n  - {name: '@default', storage: 'memory:1MiB'}\n", "starts with @"),
    ];
    for (name, text, expected) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        // --listen would replace the file's (empty) list; everywhere else it keeps a server that
        // wrongly starts off the fixed default port.
        let listen: &[&str] = if name == "listen.yaml" { &[] } else { &["--listen", "127.0.0.1:0"] };
        let path = path.to_string_lossy();
        let args = [&["serve", "--no-control"][..], listen, &["--config", &path]].concat();
        refused(&args, expected);
    }
}

#[test]
fn help_describes_every_serve_flag_and_version_prints_the_version() {
    let help = run_ok(Command::new(NBDFAULT).arg("--help"));
    assert!(help.contains("serve") && help.contains("nbdinfo"), "{help}");
    let serve_help = run_ok(Command::new(NBDFAULT).args(["serve", "--help"]));
    for flag in [
        "--config",
        "--listen",
        "--export",
        "--read-only",
        "--policy",
        "--control",
        "--no-control",
        "--control-token",
        "--control-allow-host",
        "--fault-log",
        "--handshake-timeout",
        "--max-connections",
        "--max-in-flight",
    ] {
        assert!(serve_help.contains(flag), "`nbdfault serve --help` must describe {flag}:\n{serve_help}");
    }
    assert!(serve_help.contains("memory:SIZE") && serve_help.contains("overlay:PATH"), "{serve_help}");
    let version = run_ok(Command::new(NBDFAULT).arg("--version"));
    assert!(version.contains(env!("CARGO_PKG_VERSION")), "{version}");
}

// ---- graceful shutdown -----------------------------------------------------------------------

fn stops_quickly_with_clients_attached(signal: i32) {
    let mut server = Server::memory("disk", "64MiB");
    let (mut attached, _) = RawClient::attach(server.nbd, "disk", false);
    attached.write_ok(1, 0, b"before the signal");
    let mut negotiating = RawClient::start(server.nbd, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    negotiating.send_option(OPT_LIST, &[]);
    negotiating.read_option_reply();
    negotiating.read_option_reply();
    let mut greeted = RawClient::connect(server.nbd);
    greeted.read_greeting();

    let (status, took) = server.stop_with(signal);
    assert!(status.success(), "signal {signal} must end the server with exit 0, got {status}");
    assert!(took < Duration::from_secs(2), "signal {signal}: the server took {took:?} to stop");
    assert!(attached.closed_by_server(), "the attached client is disconnected");
    assert!(negotiating.closed_by_server(), "the negotiating client is disconnected");
    assert!(greeted.closed_by_server(), "the greeted client is disconnected");
}

#[test]
fn sigterm_with_clients_attached_exits_0_within_two_seconds() {
    stops_quickly_with_clients_attached(libc::SIGTERM);
}

#[test]
fn sigint_with_clients_attached_exits_0_within_two_seconds() {
    stops_quickly_with_clients_attached(libc::SIGINT);
}

#[test]
fn sigterm_the_moment_the_server_says_ready_ends_it_with_exit_0() {
    // A supervisor may stop the server as soon as it reads the ready line: the signals must be
    // caught from then on (they once were only from the main task's first poll, and SIGTERM's
    // default action killed the server in that gap).
    for round in 0..20 {
        let mut server = Server::memory("disk", "1MiB");
        let (status, _) = server.stop_with(libc::SIGTERM);
        assert!(status.success(), "round {round}: SIGTERM right after ready must give exit 0, got {status}");
    }
}

#[test]
fn a_client_that_never_reads_its_replies_delays_shutdown_by_no_more_than_the_grace_period() {
    let mut server = Server::builder().export("disk", "memory:64MiB").args(["--shutdown-grace", "500ms"]).start();
    let (mut stuck, _) = RawClient::attach(server.nbd, "disk", false);
    // 256 MiB of READ replies: far more than the socket buffers hold, and never read.
    for i in 0..8 {
        stuck.send_request(0, CMD_READ, i, 0, 32 << 20);
    }
    std::thread::sleep(Duration::from_millis(200));
    let (status, took) = server.stop_with(libc::SIGTERM);
    assert!(status.success(), "{status}");
    assert!(took < Duration::from_millis(1500), "the server took {took:?} to stop with a 500 ms grace period");
}

#[test]
fn a_client_stalled_in_the_middle_of_a_write_payload_delays_shutdown_by_no_more_than_the_grace_period() {
    let mut server = Server::builder().export("disk", "memory:64MiB").args(["--shutdown-grace", "500ms"]).start();
    let (mut stalled, _) = RawClient::attach(server.nbd, "disk", false);
    stalled.send_request(0, CMD_WRITE, 1, 0, 1 << 20);
    stalled.send(&[0x55; 1000]);
    let (mut oversized, _) = RawClient::attach(server.nbd, "disk", false);
    oversized.send_request(0, CMD_WRITE, 2, 0, 40 << 20);
    oversized.send(&[0x55; 1000]);
    std::thread::sleep(Duration::from_millis(200));
    let (status, took) = server.stop_with(libc::SIGTERM);
    assert!(status.success(), "{status}");
    assert!(took < Duration::from_millis(1500), "the server took {took:?} to stop with a 500 ms grace period");
}

#[test]
fn writes_answered_before_sigterm_are_in_the_image_file_after_exit() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    common::empty_image(&image, 64 * MIB);
    let mut server = Server::builder().export("disk", &image).start();
    let (mut client, _) = RawClient::attach(server.nbd, "disk", false);
    // Plain writes, no FUA and no FLUSH: shutdown must flush them.
    client.write_ok(1, 12345, b"written before SIGTERM");

    // A burst of writes still arriving when the signal comes.
    let block = common::random_bytes(1 << 20);
    let mut burst = Vec::new();
    for i in 0..32u64 {
        burst.extend(RawClient::request(0, CMD_WRITE, 100 + i, (i + 1) * MIB, 1 << 20));
        burst.extend_from_slice(&block);
    }
    let mut writer = client.stream.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        // The server may stop reading part-way; that is its right.
        let _ = std::io::Write::write_all(&mut writer, &burst);
    });
    let (first, _) = client.read_simple_reply();
    assert_eq!(first, 0);
    let (status, took) = server.stop_with(libc::SIGTERM);
    assert!(status.success() && took < Duration::from_secs(2), "{status} after {took:?}");
    sender.join().unwrap();

    // Every reply that arrived is whole, and is a success or ESHUTDOWN.
    let rest = client.read_until_closed();
    assert_eq!(rest.len() % 16, 0, "replies arrive whole: {} bytes", rest.len());
    let file = std::fs::File::open(&image).unwrap();
    let mut on_disk = vec![0u8; 22];
    file.read_exact_at(&mut on_disk, 12345).unwrap();
    assert_eq!(on_disk, b"written before SIGTERM");
    let mut answered = 1;
    for reply in rest.chunks(16) {
        assert_eq!(u32_at(reply, 0), SIMPLE_REPLY_MAGIC);
        let (error, cookie) = (u32_at(reply, 4), u64_at(reply, 8));
        assert!(error == 0 || error == 108, "a write at shutdown may succeed or get ESHUTDOWN, got {error}");
        if error == 0 {
            answered += 1;
            let mut data = vec![0u8; 1 << 20];
            file.read_exact_at(&mut data, (cookie - 100 + 1) * MIB).unwrap();
            assert_same_bytes(&data, &block, &format!("the write answered to cookie {cookie}"));
        }
    }
    eprintln!("{answered} writes were answered before the server stopped");
}

// ---- file and overlay exports on disk --------------------------------------------------------

#[test]
fn fua_writes_and_zeroes_reach_the_image_file_before_they_are_answered() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::write(&image, vec![0xee; 4 * MIB as usize]).unwrap();
    let server = Server::builder().export("disk", &image).start();
    let (mut client, _) = RawClient::attach(server.nbd, "disk", false);
    client.send_write(CMD_FLAG_FUA, 1, 4097, b"durable");
    assert_eq!(client.read_simple_reply(), (0, 1));
    client.send_request(0, CMD_WRITE_ZEROES, 2, MIB, 65536);
    assert_eq!(client.read_simple_reply(), (0, 2));
    client.send_request(CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES, 3, 2 * MIB + 1, 1000);
    assert_eq!(client.read_simple_reply(), (0, 3));
    let on_disk = std::fs::read(&image).unwrap();
    assert_eq!(on_disk.len() as u64, 4 * MIB, "the image keeps its size");
    assert_eq!(&on_disk[4096..4105], b"\xeedurable\xee");
    assert!(on_disk[MIB as usize..MIB as usize + 65536].iter().all(|&b| b == 0));
    assert_eq!(on_disk[MIB as usize + 65536], 0xee);
    assert!(on_disk[2 * MIB as usize + 1..2 * MIB as usize + 1001].iter().all(|&b| b == 0));
    assert_eq!((on_disk[2 * MIB as usize], on_disk[2 * MIB as usize + 1001]), (0xee, 0xee));
}

#[test]
fn a_read_only_file_export_refuses_every_change_and_the_file_stays_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let original = common::random_bytes(MIB as usize);
    std::fs::write(&image, &original).unwrap();
    let mut server = Server::builder().export("disk", &image).args(["--read-only", "disk"]).start();
    let (mut client, attached) = RawClient::attach(server.nbd, "disk", false);
    assert_ne!(attached.flags & READ_ONLY, 0);
    client.send_write(0, 1, 0, &[0u8; 4096]);
    assert_eq!(client.read_simple_reply(), (EPERM, 1));
    client.send_request(0, CMD_TRIM, 2, 0, 4096);
    assert_eq!(client.read_simple_reply(), (EPERM, 2));
    client.send_request(0, CMD_WRITE_ZEROES, 3, 0, 4096);
    assert_eq!(client.read_simple_reply(), (EPERM, 3));
    assert_eq!(client.read_ok(4, 0, 4096), original[..4096]);
    let (status, _) = server.stop_with(libc::SIGTERM);
    assert!(status.success());
    assert_same_bytes(&std::fs::read(&image).unwrap(), &original, "the read-only image");
}

/// Makes a file immutable (`chattr +i`, so even root cannot open it for writing) until dropped.
struct Immutable<'a>(&'a std::path::Path);

impl<'a> Immutable<'a> {
    fn new(path: &'a std::path::Path) -> Immutable<'a> {
        let output = run(CHATTR.command().arg("+i").arg(path));
        assert!(
            output.status.success(),
            "chattr +i needs root and a filesystem with attributes (ext4, xfs): {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Immutable(path)
    }
}

impl Drop for Immutable<'_> {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(self.0).status();
    }
}

#[test]
fn an_image_that_cannot_be_written_is_refused_unless_exported_read_only() {
    require!(CHATTR);
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("golden.img");
    let original = common::random_bytes(MIB as usize);
    std::fs::write(&image, &original).unwrap();
    let _immutable = Immutable::new(&image);
    let spec = format!("golden={}", image.display());
    let args = ["serve", "--no-control", "--listen", "127.0.0.1:0", "--export", &spec];
    refused(&args, "export it read-only");
    let server = Server::builder().export("golden", &image).args(["--read-only", "golden"]).start();
    let (mut client, attached) = RawClient::attach(server.nbd, "golden", false);
    assert_ne!(attached.flags & READ_ONLY, 0);
    assert_eq!(client.read_ok(1, 4096, 4096), original[4096..8192]);
    client.send_write(0, 2, 0, b"no");
    assert_eq!(client.read_simple_reply(), (EPERM, 2));
}

#[test]
fn an_overlay_never_changes_its_base_image_whatever_is_written_flushed_or_trimmed() {
    require!(QEMU_IO);
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.img");
    let original = common::random_bytes(8 * MIB as usize);
    std::fs::write(&base, &original).unwrap();
    let modified = std::fs::metadata(&base).unwrap().modified().unwrap();
    let mut spec = std::ffi::OsString::from("overlay:");
    spec.push(&base);
    let mut server = Server::builder().export("cow", spec).start();
    let uri = server.uri("cow");
    run_ok(QEMU_IO.command().args([
        "-f",
        "raw",
        "-c",
        "write -P 0x11 1 3",
        "-c",
        "write -f -P 0x22 1M 1M",
        "-c",
        "write -z 3M 1M",
        "-c",
        "write -z -u 4M 100000",
        "-c",
        "discard 5M 2M",
        "-c",
        "flush",
        "-c",
        "read -P 0x11 1 3",
        "-c",
        "read -P 0x22 1M 1M",
        "-c",
        "read -P 0 3M 1M",
        &uri,
    ]));
    // Untouched bytes still come from the base.
    let (mut client, _) = RawClient::attach(server.nbd, "cow", false);
    assert_eq!(client.read_ok(1, 7 * MIB + 5, 100), original[7 * MIB as usize + 5..7 * MIB as usize + 105]);
    assert_eq!(client.read_ok(2, 0, 8), [&original[..1], &[0x11; 3], &original[4..8]].concat());
    drop(client);
    let (status, _) = server.stop_with(libc::SIGTERM);
    assert!(status.success());
    assert_same_bytes(&std::fs::read(&base).unwrap(), &original, "the overlay's base image");
    assert_eq!(std::fs::metadata(&base).unwrap().modified().unwrap(), modified, "the base was not written to");
}
