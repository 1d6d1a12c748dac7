//! The event stream (`GET /v1/exports/{name}/events`) against the real binary: order, bounded
//! memory with a subscriber that never reads, the end of streams at shutdown, and `nbdfault ctl
//! watch`.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::fd::FromRawFd;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::control::{Api, ops, poll};
use common::{FIO, NBDFAULT, PYTHON_NBD, Server, require};
use nbdfault_control_client::Event;

const FAIL_ARMED: &str =
    "rules: [{name: fail-armed, when: {op: write, range: 1MiB..2MiB, armed_by: go}, then: {error: EIO, delay: 20ms}}]";

/// Reads the export's events in a thread; they arrive on the channel in stream order.
fn subscribe(api: &Api, export: &str, rate: Option<u32>) -> mpsc::Receiver<Event> {
    let events = api.client().events(export, rate).unwrap();
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        for event in events {
            let Ok(event) = event else { return };
            if sender.send(event).is_err() {
                return;
            }
        }
    });
    receiver
}

/// Takes events until one of kind `last` (included), for at most 30 s.
#[track_caller]
fn until(events: &mpsc::Receiver<Event>, last: &str) -> Vec<Event> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut taken = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let event = events.recv_timeout(left).unwrap_or_else(|_| panic!("no `{last}` event within 30 s: {taken:#?}"));
        let done = event.kind == last;
        taken.push(event);
        if done {
            return taken;
        }
    }
}

#[test]
fn the_stream_tells_every_request_fault_trigger_policy_and_reset_in_the_order_they_happened() {
    require!(PYTHON_NBD);
    let server = Server::builder().export("disk", "memory:16MiB").with_control().start();
    let api = Api::new(&server);
    api.set_policy("disk", FAIL_ARMED);
    let events = subscribe(&api, "disk", Some(0));
    let hello = until(&events, "hello");
    assert_eq!((hello[0].data["export"].as_str(), hello[0].data["size"].as_u64()), (Some("disk"), Some(16 << 20)));

    api.arm("disk", "go");
    let results = ops(&server.uri("disk"), &["write 0 4096 1", "write 1048576 4096 2", "read 0 4096"]);
    results[1].expect_errno("EIO");
    api.disarm("disk", "go");
    api.set_policy("disk", "rules: [{name: other, when: {op: trim}, then: {error: EIO}}]");
    api.reset("disk");
    let seen = until(&events, "reset");

    let ids: Vec<u64> = seen.iter().map(|event| event.id.expect("every event after hello has an id")).collect();
    assert!(ids.windows(2).all(|pair| pair[0] < pair[1]), "ids increase: {ids:?}");
    // What happened, in order (requests libnbd may add, such as a final flush, are left out).
    let story: Vec<String> = seen
        .iter()
        .filter(|event| event.kind != "request" || matches!(event.data["op"].as_str(), Some("write" | "read")))
        .map(|event| {
            let data = &event.data;
            match event.kind.as_str() {
                "request" => format!(
                    "request {} {} {}",
                    data["op"].as_str().unwrap(),
                    data["offset"],
                    data["errno"].as_str().unwrap_or("ok")
                ),
                "pending" => format!(
                    "pending {} {} {}",
                    data["op"].as_str().unwrap(),
                    data["offset"],
                    data["rule"].as_str().unwrap()
                ),
                "fault" => format!("fault {} {}", data["offset"], data["errno"].as_str().unwrap()),
                "trigger" => format!("trigger {} {}", data["trigger"].as_str().unwrap(), data["armed"]),
                "policy" => format!("policy {}", data["rules"]),
                other => other.to_string(),
            }
        })
        .collect();
    assert_eq!(
        story,
        [
            "trigger go true",
            "request write 0 ok",
            "pending write 1048576 fail-armed",
            "fault 1048576 EIO",
            "request write 1048576 EIO",
            "request read 0 ok",
            "trigger go false",
            "policy [\"other\"]",
            "reset",
        ],
        "{seen:#?}"
    );
    let failed = seen.iter().find(|event| event.kind == "request" && event.data["errno"] == "EIO").unwrap();
    assert_eq!((failed.data["rule"].as_str(), failed.data["outcome"].as_str()), (Some("fail-armed"), Some("error")));
    let took = failed.data["end_ns"].as_u64().unwrap() - failed.data["start_ns"].as_u64().unwrap();
    assert!(took >= 20_000_000, "the 20 ms delay is inside the request's time: {took} ns");
    let fault = seen.iter().find_map(Event::fault).expect("the fault event carries a fault-log record");
    assert_eq!(fault, api.client().faults("disk", 0).unwrap().records[0], "the same record as GET .../faults");
}

#[test]
fn requests_over_the_rate_are_summed_up_and_faults_are_never_left_out() {
    require!(PYTHON_NBD);
    let server = Server::builder().export("disk", "memory:16MiB").with_control().start();
    let api = Api::new(&server);
    api.set_policy("disk", "rules: [{name: every-tenth, when: {op: write, nth: {every: 10}}, then: {error: EIO}}]");
    // 10 request events per second: one per 100 ms slot; the rest go into aggregates.
    let events = subscribe(&api, "disk", Some(10));
    until(&events, "hello");
    let writes: Vec<String> = (0..200).map(|i| format!("write {} 4096 1", i * 4096)).collect();
    ops(&server.uri("disk"), &writes);
    api.reset("disk");
    let seen = until(&events, "reset");
    let count = |kind: &str| seen.iter().filter(|event| event.kind == kind).count();
    assert_eq!(count("fault"), 20, "every fault-log record is sent");
    let aggregated: u64 = seen
        .iter()
        .filter(|event| event.kind == "aggregate")
        .map(|event| event.data["ops"]["write"]["requests"].as_u64().unwrap_or(0))
        .sum();
    let one_by_one = seen.iter().filter(|event| event.kind == "request" && event.data["op"] == "write").count() as u64;
    assert_eq!(one_by_one + aggregated, 200, "each write is sent or summed up, once");
    assert!(aggregated > 0, "200 writes in well under 20 s go over 10 per second");
    let errors: u64 = seen
        .iter()
        .filter(|event| event.kind == "aggregate")
        .map(|event| event.data["ops"]["write"]["errors"].as_u64().unwrap_or(0))
        .sum();
    let failed_one_by_one = seen.iter().filter(|event| event.kind == "request" && event.data["errno"] == "EIO").count();
    assert_eq!(errors + failed_one_by_one as u64, 20);
}

/// A TCP connection to `address` whose receive buffer is as small as the kernel allows, so a
/// peer that writes to it and is never read from fills it at once.
fn tiny_window_connection(address: std::net::SocketAddr) -> TcpStream {
    let std::net::SocketAddr::V4(address) = address else { panic!("the control API listens on IPv4 here") };
    // SAFETY: a plain socket call; the descriptor is checked and owned by the TcpStream below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: fd is ours and open; the TcpStream closes it when dropped, also on a failed assert.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    let size: libc::c_int = 1;
    // SAFETY: setsockopt reads `size` (an int, as SO_RCVBUF wants) for the given length.
    let set = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(set, 0, "setsockopt: {}", std::io::Error::last_os_error());
    let target = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: address.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(*address.ip()).to_be() },
        sin_zero: [0; 8],
    };
    // SAFETY: connect reads the sockaddr_in for its length; fd is an open socket.
    let connected = unsafe {
        libc::connect(
            fd,
            (&target as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    assert_eq!(connected, 0, "connect: {}", std::io::Error::last_os_error());
    stream
}

#[test]
fn a_subscriber_that_never_reads_is_dropped_with_a_message_and_others_keep_their_stream() {
    require!(FIO);
    let server = Server::builder().export("disk", "memory:1MiB").with_control().start();
    let api = Api::new(&server);
    let control = server.control.unwrap();
    let mut stuck = tiny_window_connection(control);
    write!(stuck, "GET /v1/exports/disk/events?rate=0 HTTP/1.1\r\nHost: {control}\r\n\r\n").unwrap();
    let reader = subscribe(&api, "disk", Some(0));
    until(&reader, "hello");
    poll("both subscribers attached", || {
        api.get("/metrics").text().contains("nbdfault_event_subscribers{export=\"disk\"} 2").then_some(())
    });
    let before = server.resident_memory();

    // Far more events than the stuck subscriber's queue and socket buffers hold, at a pace the
    // other reader (a thread of this debug-built test, sharing the cores with the server and the
    // tests beside it) keeps up with: at full speed it too can fall a queue behind and be
    // dropped, rightly.
    let output = FIO
        .command()
        .args([
            "--name=events",
            "--ioengine=nbd",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--size=1M",
            "--io_size=1G",
        ])
        .args(["--number_ios=40000", "--rate_iops=5000", "--norandommap", "--output-format=terse"])
        .arg(format!("--uri={}", server.uri("disk")))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(output.status.success(), "fio: {}", String::from_utf8_lossy(&output.stderr));
    let metrics = api.get("/metrics").text();
    assert!(metrics.contains("nbdfault_event_subscribers_dropped_total{export=\"disk\"} 1"), "{metrics}");
    assert!(metrics.contains("nbdfault_event_subscribers{export=\"disk\"} 1"), "the reader is still there: {metrics}");
    let grown = server.resident_memory().saturating_sub(before);
    assert!(grown < 16 << 20, "the server grew by {} MiB while a subscriber did not read", grown >> 20);

    // The reader that keeps up saw every write, in order, and was never dropped.
    api.reset("disk");
    let seen = until(&reader, "reset");
    assert!(seen.iter().all(|event| event.kind != "dropped"));
    let writes = seen.iter().filter(|event| event.kind == "request" && event.data["op"] == "write").count();
    assert_eq!(writes, 40000, "every write, one by one");

    // The stuck one, read at last: what its buffers held, then why it was dropped, then the end.
    stuck.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut text = String::new();
    BufReader::new(&mut stuck).read_to_string(&mut text).ok();
    let last = text.trim_end().lines().rev().find(|line| line.starts_with("data:")).unwrap_or_default();
    assert!(
        text.contains("event: dropped") && last.contains("reads too slowly"),
        "{}",
        &text[text.len().saturating_sub(2000)..]
    );
}

#[test]
fn shutdown_ends_every_stream_with_a_last_event() {
    let mut server = Server::builder().export("disk", "memory:1MiB").with_control().start();
    let api = Api::new(&server);
    let events = subscribe(&api, "disk", None);
    until(&events, "hello");
    let (status, took) = server.stop_with(libc::SIGTERM);
    assert!(status.success(), "{status}");
    assert!(took < Duration::from_secs(5), "shutdown waited {took:?} for the stream");
    let last = until(&events, "dropped");
    assert!(last.last().unwrap().data["reason"].as_str().unwrap().contains("shutting down"));
}

#[test]
fn ctl_watch_prints_requests_and_faults_as_they_happen() {
    require!(PYTHON_NBD);
    let server = Server::builder().export("disk", "memory:16MiB").with_control().start();
    let api = Api::new(&server);
    api.set_policy("disk", FAIL_ARMED);
    api.arm("disk", "go");
    for json in [false, true] {
        let mut watch = Command::new(NBDFAULT)
            .args(["ctl", "--url", api.base(), "watch", "disk", "--rate", "0"])
            .args(json.then_some("--json"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
        let first = lines.next().unwrap().unwrap();
        ops(&server.uri("disk"), &["write 1048576 4096 2"]);
        let mut seen = vec![first];
        // Up to the failed write's own request line.
        let is_failed_request = |line: &str| {
            if json {
                let event: serde_json::Value = serde_json::from_str(line).unwrap();
                event["event"] == "request" && event["data"]["errno"] == "EIO"
            } else {
                line.contains("EIO") && line.contains("rule fail-armed (error)")
            }
        };
        while !is_failed_request(seen.last().unwrap()) {
            seen.push(lines.next().expect("ctl watch ended early").unwrap());
        }
        watch.kill().unwrap();
        watch.wait().unwrap();
        if json {
            let events: Vec<serde_json::Value> = seen.iter().map(|line| serde_json::from_str(line).unwrap()).collect();
            assert_eq!(events[0]["event"], "hello");
            assert!(
                events.iter().any(|event| event["event"] == "fault" && event["data"]["rule"] == "fail-armed"),
                "{seen:#?}"
            );
        } else {
            assert!(seen[0].starts_with("watching export \"disk\""), "{seen:#?}");
            assert!(
                seen.iter().any(|line| line.contains("PENDING") && line.contains("delayed 20.000 ms")),
                "{seen:#?}"
            );
            assert!(
                seen.iter().any(|line| line.contains("fault #1: rule fail-armed error write at 1048576")),
                "{seen:#?}"
            );
            let failed = seen.last().unwrap();
            assert!(failed.contains("write") && failed.contains("offset      1048576"), "{failed}");
        }
    }
}
