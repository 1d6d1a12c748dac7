//! Real clients from Debian's packages against the real server: nbdinfo, nbdcopy (libnbd-bin),
//! qemu-io, qemu-img and qemu-nbd (qemu-utils), and fio's nbd engine (fio).

mod common;

use std::path::Path;

use common::{FIO, NBD_CLIENT, NBDCOPY, NBDINFO, QEMU_IMG, QEMU_IO, QEMU_NBD, require};
use common::{Server, assert_same_bytes, json, run, run_ok};
use serde_json::Value;

const MIB: u64 = 1 << 20;

fn nbdinfo() -> std::process::Command {
    NBDINFO.command()
}

fn nbdcopy() -> std::process::Command {
    NBDCOPY.command()
}

fn qemu_io() -> std::process::Command {
    QEMU_IO.command()
}

fn qemu_img() -> std::process::Command {
    QEMU_IMG.command()
}

/// Runs qemu-io with `-c COMMAND` for each command; any failed command or pattern fails the test.
fn qemu_io_commands(uri: &str, commands: &[&str]) -> String {
    let output = common::qemu_io(uri, &[], commands);
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "qemu-io {commands:?} failed:\n{text}{}", String::from_utf8_lossy(&output.stderr));
    let output = text;
    for bad in ["verification failed", "failed", "error", "Error"] {
        assert!(!output.contains(bad), "qemu-io reported `{bad}`:\n{output}");
    }
    output
}

/// The one export `nbdinfo --json URI` describes.
fn nbdinfo_json(uri: &str) -> Value {
    let info = json(&run_ok(nbdinfo().arg("--json").arg(uri)));
    assert_eq!(info["protocol"], "newstyle-fixed", "{info}");
    assert_eq!(info["structured"], true, "{info}");
    info["exports"][0].clone()
}

/// Exit status of `nbdinfo --can FLAG` or `--is FLAG`: 0 true, 2 false.
fn nbdinfo_says(question: &str, flag: &str, uri: &str) -> bool {
    let output = run(nbdinfo().args([question, flag, uri]));
    match output.status.code() {
        Some(0) => true,
        Some(2) => false,
        _ => panic!("nbdinfo {question} {flag} {uri} failed: {}", String::from_utf8_lossy(&output.stderr)),
    }
}

const CAN_FLAGS: [&str; 8] = ["flush", "fua", "trim", "zero", "fast-zero", "df", "multi-conn", "cache"];

// ---- nbdinfo ---------------------------------------------------------------------------------

#[test]
fn nbdinfo_reports_the_size_and_every_capability_of_writable_memory_file_and_overlay_exports() {
    require!(NBDINFO);
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    common::empty_image(&image, 16 * MIB);
    let base = dir.path().join("base.img");
    common::empty_image(&base, 32 * MIB);
    let mut overlay = std::ffi::OsString::from("overlay:");
    overlay.push(&base);
    let server = Server::builder().export("mem", "memory:64MiB").export("file", &image).export("cow", overlay).start();
    for (export, size) in [("mem", 64 * MIB), ("file", 16 * MIB), ("cow", 32 * MIB)] {
        let uri = server.uri(export);
        let info = nbdinfo_json(&uri);
        assert_eq!(info["export-name"], export);
        assert_eq!(info["export-size"], size, "{export}: {info}");
        assert_eq!(info["is_read_only"], false, "{export}: {info}");
        for flag in CAN_FLAGS {
            let key = format!("can_{}", flag.replace('-', "_"));
            assert_eq!(info[&key], true, "{export} must offer {flag}: {info}");
            assert!(nbdinfo_says("--can", flag, &uri), "nbdinfo --can {flag} {uri}");
        }
        assert!(!nbdinfo_says("--is", "read-only", &uri), "{export} is writable");
        assert!(info["contexts"].as_array().unwrap().contains(&Value::from("base:allocation")), "{info}");
        assert!(info["block_size_maximum"].as_u64().unwrap() >= 32 * MIB, "{info}");
    }
}

#[test]
fn nbdinfo_reports_read_only_exports_as_read_only_without_write_capabilities() {
    require!(NBDINFO);
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    common::empty_image(&image, 4 * MIB);
    let server = Server::builder()
        .export("mem", "memory:8MiB")
        .export("file", &image)
        .args(["--read-only", "mem", "--read-only", "file"])
        .start();
    for export in ["mem", "file"] {
        let uri = server.uri(export);
        let info = nbdinfo_json(&uri);
        assert_eq!(info["is_read_only"], true, "{info}");
        assert!(nbdinfo_says("--is", "read-only", &uri), "nbdinfo --is read-only {uri}");
        for flag in ["flush", "fua", "trim", "zero", "fast-zero"] {
            assert!(!nbdinfo_says("--can", flag, &uri), "a read-only export must not offer {flag}");
        }
        for flag in ["df", "multi-conn", "cache"] {
            assert!(nbdinfo_says("--can", flag, &uri), "a read-only export still offers {flag}");
        }
    }
}

#[test]
fn nbdinfo_lists_every_export_including_the_default_one() {
    require!(NBDINFO);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("nbdfault.yaml");
    std::fs::write(
        &config,
        "exports:\n\
         \x20 - {name: '', storage: 'memory:1MiB', description: the default export}\n\
         \x20 - {name: disk, storage: 'memory:2MiB', description: a disk}\n\
         \x20 - {name: scratch, storage: 'memory:3MiB', read_only: true}\n",
    )
    .unwrap();
    let server = Server::builder().arg("--config").arg(&config).start();
    let listed = json(&run_ok(nbdinfo().args(["--list", "--json"]).arg(format!("nbd://{}", server.nbd))));
    let mut exports: Vec<(String, u64, bool, String)> = listed["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["export-name"].as_str().unwrap().to_string(),
                e["export-size"].as_u64().unwrap(),
                e["is_read_only"].as_bool().unwrap(),
                e["description"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    exports.sort();
    assert_eq!(
        exports,
        vec![
            (String::new(), MIB, false, "the default export".to_string()),
            ("disk".to_string(), 2 * MIB, false, "a disk".to_string()),
            ("scratch".to_string(), 3 * MIB, true, String::new()),
        ],
        "{listed}"
    );
    // A URI without an export name reaches the default export.
    assert_eq!(nbdinfo_json(&format!("nbd://{}", server.nbd))["export-size"], MIB);
}

/// `nbdinfo --map --json` as `(offset, length, type)`.
fn map(uri: &str) -> Vec<(u64, u64, u64)> {
    let map = json(&run_ok(nbdinfo().args(["--map", "--json", uri])));
    let extents: Vec<(u64, u64, u64)> = map
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap(), e["type"].as_u64().unwrap()))
        .collect();
    let mut position = 0;
    for &(offset, length, _) in &extents {
        assert_eq!(offset, position, "the map has no gaps or overlaps: {extents:?}");
        position += length;
    }
    extents
}

const DATA: u64 = 0;
const HOLE: u64 = 3;

#[test]
fn nbdinfo_map_shows_data_where_written_and_holes_elsewhere() {
    require!(NBDINFO, QEMU_IO);
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    common::empty_image(&image, 8 * MIB);
    let base = dir.path().join("base.img");
    common::empty_image(&base, 8 * MIB);
    qemu_io_commands(&base.to_string_lossy(), &["write -P 0x42 0 1M"]);
    let mut overlay = std::ffi::OsString::from("overlay:");
    overlay.push(&base);
    let server = Server::builder().export("mem", "memory:8MiB").export("file", &image).export("cow", overlay).start();

    for export in ["mem", "file"] {
        let uri = server.uri(export);
        assert_eq!(map(&uri), vec![(0, 8 * MIB, HOLE)], "{export} starts as one hole");
        qemu_io_commands(&uri, &["write -P 0x11 1M 1M", "write -P 0x22 4M 64k"]);
        assert_eq!(
            map(&uri),
            vec![
                (0, MIB, HOLE),
                (MIB, MIB, DATA),
                (2 * MIB, 2 * MIB, HOLE),
                (4 * MIB, 64 << 10, DATA),
                (4 * MIB + (64 << 10), 4 * MIB - (64 << 10), HOLE)
            ],
            "{export} after two writes"
        );
        // Zeroing with unmap allowed, and trimming, make holes again.
        qemu_io_commands(&uri, &["write -z -u 1M 1M", "discard 4M 64k"]);
        assert_eq!(map(&uri), vec![(0, 8 * MIB, HOLE)], "{export} after zeroing and trimming");
    }

    // The overlay shows the base's data and holes, plus its own writes.
    let uri = server.uri("cow");
    assert_eq!(map(&uri), vec![(0, MIB, DATA), (MIB, 7 * MIB, HOLE)], "the base shows through");
    qemu_io_commands(&uri, &["write -P 0x33 4M 1M"]);
    assert_eq!(map(&uri), vec![(0, MIB, DATA), (MIB, 3 * MIB, HOLE), (4 * MIB, MIB, DATA), (5 * MIB, 3 * MIB, HOLE)]);
    qemu_io_commands(&uri, &["write -z -u 0 1M", "read -P 0 0 1M", "read -P 0x33 4M 1M"]);
    assert_eq!(
        map(&uri),
        vec![(0, 4 * MIB, HOLE), (4 * MIB, MIB, DATA), (5 * MIB, 3 * MIB, HOLE)],
        "zeroing hides the base"
    );
}

#[test]
fn odd_sized_exports_serve_their_last_bytes_to_every_client() {
    require!(NBDINFO, NBDCOPY, QEMU_IO);
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("odd.img");
    let original = common::random_bytes(1_000_001);
    std::fs::write(&image, &original).unwrap();
    let base = dir.path().join("base.img");
    std::fs::write(&base, &original).unwrap();
    let mut overlay = std::ffi::OsString::from("overlay:");
    overlay.push(&base);
    let server = Server::builder().export("mem", "memory:1000").export("file", &image).export("cow", overlay).start();
    for (export, size) in [("mem", 1000u64), ("file", 1_000_001), ("cow", 1_000_001)] {
        let uri = server.uri(export);
        assert_eq!(nbdinfo_json(&uri)["export-size"], size);
        let covered: u64 = map(&uri).iter().map(|e| e.1).sum();
        assert_eq!(covered, size, "{export}: the map covers the export exactly");
        let out = dir.path().join(format!("{export}.out"));
        common::empty_image(&out, size);
        run_ok(nbdcopy().arg(&uri).arg(&out));
        let copied = std::fs::read(&out).unwrap();
        if export == "mem" {
            assert!(copied.iter().all(|&b| b == 0));
        } else {
            assert_same_bytes(&copied, &original, export);
        }
        let last = size - 7;
        qemu_io_commands(&uri, &[&format!("write -P 0x5e {last} 7"), &format!("read -P 0x5e {last} 7")]);
        let output = run(qemu_io().args(["-f", "raw", "-c", &format!("write -P 0x5e {last} 8")]).arg(&uri));
        let text = String::from_utf8_lossy(&output.stdout) + String::from_utf8_lossy(&output.stderr);
        assert!(!text.contains("wrote 8/8"), "{export}: a write past the end must fail:\n{text}");
    }
    assert_eq!(std::fs::read(&image).unwrap()[1_000_001 - 7..], [0x5e; 7], "the file export wrote its last bytes");
    assert_same_bytes(&std::fs::read(&base).unwrap(), &original, "the overlay's base");
}

#[test]
fn export_names_with_spaces_and_non_ascii_letters_work_through_uris() {
    require!(NBDINFO, QEMU_IO);
    let name = "my disk ü";
    let server = Server::builder().export(name, "memory:2MiB").start();
    let uri = server.uri("my%20disk%20%C3%BC");
    let info = nbdinfo_json(&uri);
    assert_eq!((info["export-name"].as_str(), info["export-size"].as_u64()), (Some(name), Some(2 * MIB)));
    qemu_io_commands(&uri, &["write -P 0x21 0 4096", "read -P 0x21 0 4096"]);
    let listed = json(&run_ok(nbdinfo().args(["--list", "--json"]).arg(server.uri(""))));
    assert_eq!(listed["exports"][0]["export-name"], name);
}

// ---- nbdcopy ---------------------------------------------------------------------------------

/// Copies 64 MiB of random data (with a hole in it) into `export` with many connections and
/// requests in flight, then back out, and returns what was copied in.
fn nbdcopy_round_trip(server: &Server, export: &str, dir: &Path) -> Vec<u8> {
    nbdcopy_round_trip_with(server, export, dir, &["--connections=4", "--requests=64"])
}

fn nbdcopy_round_trip_with(server: &Server, export: &str, dir: &Path, args: &[&str]) -> Vec<u8> {
    let source = dir.join(format!("{export}-in.img"));
    let data = common::random_image(&source, 64 << 20, true);
    let uri = server.uri(export);
    run_ok(nbdcopy().args(args).arg("--flush").arg(&source).arg(&uri));
    let out = dir.join(format!("{export}-out.img"));
    common::empty_image(&out, 64 * MIB);
    run_ok(nbdcopy().args(args).arg(&uri).arg(&out));
    assert_same_bytes(&std::fs::read(&out).unwrap(), &data, &format!("nbdcopy in and out of {export}"));
    data
}

#[test]
fn nbdcopy_round_trips_64_mib_of_random_data_through_a_memory_export() {
    require!(NBDCOPY);
    let dir = tempfile::tempdir().unwrap();
    let server = Server::memory("mem", "64MiB");
    nbdcopy_round_trip(&server, "mem", dir.path());
}

#[test]
fn nbdcopy_round_trips_64_mib_in_requests_of_the_largest_size_32_mib() {
    require!(NBDCOPY);
    let dir = tempfile::tempdir().unwrap();
    let server = Server::memory("mem", "64MiB");
    let args = ["--connections=2", "--requests=2", "--request-size=33554432"];
    nbdcopy_round_trip_with(&server, "mem", dir.path(), &args);
}

#[test]
fn nbdcopy_round_trips_64_mib_through_a_file_export_and_the_data_is_in_the_file() {
    require!(NBDCOPY);
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    // Start from garbage, so that the zeroed stretch must really be zeroed.
    std::fs::write(&image, common::random_bytes(64 << 20)).unwrap();
    let server = Server::builder().export("file", &image).start();
    let data = nbdcopy_round_trip(&server, "file", dir.path());
    assert_same_bytes(&std::fs::read(&image).unwrap(), &data, "the image file after nbdcopy --flush");
}

#[test]
fn nbdcopy_round_trips_64_mib_through_an_overlay_and_the_base_never_changes() {
    require!(NBDCOPY);
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.img");
    let original = common::random_bytes(64 << 20);
    std::fs::write(&base, &original).unwrap();
    let mut spec = std::ffi::OsString::from("overlay:");
    spec.push(&base);
    let server = Server::builder().export("cow", spec).start();
    nbdcopy_round_trip(&server, "cow", dir.path());
    assert_same_bytes(&std::fs::read(&base).unwrap(), &original, "the overlay's base image");
}

// ---- qemu ------------------------------------------------------------------------------------

#[test]
fn qemu_io_pattern_writes_and_reads_at_unaligned_offsets_verify() {
    require!(QEMU_IO);
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    common::empty_image(&image, 16 * MIB);
    let server = Server::builder().export("mem", "memory:16MiB").export("file", &image).start();
    for export in ["mem", "file"] {
        let uri = server.uri(export);
        qemu_io_commands(
            &uri,
            &[
                "write -P 0x55 1 3",
                "read -P 0x55 1 3",
                "read -P 0 0 1",
                "read -P 0 4 4092",
                "write -P 0xaa 4095 8194",
                "read -P 0xaa 4095 8194",
                "read -P 0x55 1 3",
                // FUA write, and a write across a 64 KiB boundary.
                "write -f -P 0x66 65535 2",
                "read -P 0x66 65535 2",
                // Zeroes: NO_HOLE first, then with unmap allowed, both unaligned.
                "write -P 0x33 100000 70000",
                "write -z 100001 1000",
                "write -z -u 120003 40000",
                "read -P 0x33 100000 1",
                "read -P 0 100001 1000",
                "read -P 0x33 101001 19002",
                "read -P 0 120003 40000",
                "read -P 0x33 160003 9997",
                // A trim, then the data around it is intact.
                "write -P 0x44 1M 3M",
                "discard 2M 1M",
                "read -P 0x44 1M 1M",
                "read -P 0x44 3M 1M",
                "flush",
                // Several requests in flight.
                "aio_write -P 0x99 8M 64k",
                "aio_write -P 0x9a 9M 64k",
                "aio_write -P 0x9b 10M 1",
                "aio_flush",
                "read -P 0x99 8M 64k",
                "read -P 0x9a 9M 64k",
                "read -P 0x9b 10M 1",
                // The very end of the export.
                "write -P 0x77 16777213 3",
                "read -P 0x77 16777213 3",
            ],
        );
        // A new connection sees everything.
        qemu_io_commands(
            &uri,
            &[
                "read -P 0x55 1 3",
                "read -P 0xaa 4095 8194",
                "read -P 0 100001 1000",
                "read -P 0x99 8M 64k",
                "read -P 0x77 16777213 3",
            ],
        );
        // A pattern that does not match is noticed (the checks above are not vacuous).
        let output = run(qemu_io().args(["-f", "raw", "-c", "read -P 0x12 1 3"]).arg(&uri));
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(!output.status.success() && text.contains("verification failed"), "{text}");
    }
}

#[test]
fn qemu_img_info_and_map_describe_the_export() {
    require!(QEMU_IMG, QEMU_IO);
    let server = Server::memory("disk", "64MiB");
    let uri = server.uri("disk");
    let info = json(&run_ok(qemu_img().args(["info", "--output=json"]).arg(&uri)));
    assert_eq!(info["virtual-size"], 64 * MIB, "{info}");
    qemu_io_commands(&uri, &["write -P 0x12 2M 1M"]);
    let map = json(&run_ok(qemu_img().args(["map", "--output=json"]).arg(&uri)));
    let entries: Vec<(u64, u64, bool, bool)> = map
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap(), e["data"] == true, e["zero"] == true))
        .collect();
    assert_eq!(
        entries,
        vec![(0, 2 * MIB, false, true), (2 * MIB, MIB, true, false), (3 * MIB, 61 * MIB, false, true)],
        "{map}"
    );
}

#[test]
fn qemu_img_convert_copies_an_image_into_and_out_of_the_export() {
    require!(QEMU_IMG);
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source.img");
    let data = common::random_image(&source, 16 << 20, true);
    let server = Server::memory("disk", "16MiB");
    let uri = server.uri("disk");
    // Out-of-order writes from 16 coroutines at once.
    run_ok(qemu_img().args(["convert", "-n", "-W", "-m", "16", "-f", "raw", "-O", "raw"]).arg(&source).arg(&uri));
    run_ok(qemu_img().args(["compare", "-f", "raw", "-F", "raw"]).arg(&source).arg(&uri));
    let out = dir.path().join("out.img");
    run_ok(qemu_img().args(["convert", "-f", "raw", "-O", "raw"]).arg(&uri).arg(&out));
    assert_same_bytes(&std::fs::read(&out).unwrap(), &data, "qemu-img convert out of the export");
}

#[test]
fn qemu_nbd_list_shows_every_export_with_its_size_flags_and_contexts() {
    require!(QEMU_NBD);
    let server = Server::builder()
        .export("", "memory:1MiB")
        .export("disk", "memory:64MiB")
        .export("ro", "memory:2MiB")
        .args(["--read-only", "ro"])
        .start();
    let port = server.port().to_string();
    let listing = run_ok(QEMU_NBD.command().args(["--list", "-b", "127.0.0.1", "-p", &port]));
    assert!(listing.contains("exports available: 3"), "{listing}");
    for (name, size) in [("''", MIB), ("'disk'", 64 * MIB), ("'ro'", 2 * MIB)] {
        let start = listing.find(&format!("export: {name}")).unwrap_or_else(|| panic!("no {name}:\n{listing}"));
        let section = &listing[start..];
        let section = &section[..section[1..].find("export: ").map_or(section.len(), |end| end + 1)];
        assert!(section.contains(&format!("size:  {size}")), "{section}");
        assert!(section.contains("base:allocation"), "{section}");
        assert!(section.contains("multi"), "{section}");
        if name == "'ro'" {
            assert!(section.contains("readonly") && !section.contains("trim"), "{section}");
        } else {
            for flag in ["flush", "fua", "trim", "zeroes", "df", "cache", "fast-zero"] {
                assert!(section.contains(flag), "{name} must show {flag}:\n{section}");
            }
        }
    }
}

// ---- nbd-client (the kernel's client; only its device-free listing is safe to run here) -----

#[test]
fn nbd_client_lists_the_exports_and_leaves_with_abort() {
    require!(NBD_CLIENT);
    let server = Server::builder().export("", "memory:1MiB").export("disk", "memory:1MiB").start();
    let port = server.port().to_string();
    let listing = run_ok(NBD_CLIENT.command().args(["-l", "127.0.0.1", &port]));
    let mut names: Vec<&str> = listing.lines().skip_while(|line| !line.starts_with("Negotiation")).skip(1).collect();
    names.sort();
    assert_eq!(names, vec!["", "disk"], "nbd-client -l output:\n{listing}");
    // nbd-client sends ABORT and closes without reading the ACK: that is a normal end.
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert!(!server.stderr().contains("handshake failed"), "{}", server.stderr());
}

// ---- fio -------------------------------------------------------------------------------------

/// Runs fio's nbd engine; returns fio's exit success and its one job's JSON.
fn fio(uri: &str, args: &[&str]) -> (bool, Value, String) {
    // fio's verify runs save a state file in the working directory: keep it out of the checkout.
    let state = tempfile::tempdir().unwrap();
    let mut command = FIO.command();
    command.current_dir(state.path());
    command.args(["--name=nbdfault", "--ioengine=nbd", "--output-format=json", "--bs=4k", "--iodepth=32"]);
    command.arg(format!("--uri={uri}")).args(args);
    let output = run(&mut command);
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let report = json(&stdout);
    (output.status.success(), report["jobs"][0].clone(), stderr)
}

#[test]
fn fio_random_reads_and_writes_verify_with_crc32c() {
    require!(FIO);
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    common::empty_image(&image, 64 * MIB);
    let base = dir.path().join("base.img");
    common::empty_image(&base, 64 * MIB);
    let mut overlay = std::ffi::OsString::from("overlay:");
    overlay.push(&base);
    let server = Server::builder().export("disk", "memory:64MiB").export("file", &image).export("cow", overlay).start();
    for export in ["disk", "file", "cow"] {
        let (ok, job, stderr) = fio(&server.uri(export), &["--rw=randrw", "--size=16M", "--verify=crc32c"]);
        assert!(ok && job["error"] == 0, "{export}: fio randrw with verify failed: {stderr}\n{job}");
        let written = job["write"]["io_bytes"].as_u64().unwrap();
        let read = job["read"]["io_bytes"].as_u64().unwrap();
        assert!(written > 4 * MIB && read > written, "{export}: fio wrote {written} and read {read} bytes");
    }
    let uri = server.uri("disk");

    // Write everything, then verify it on a new connection.
    let (ok, job, stderr) = fio(&uri, &["--rw=randwrite", "--size=16M", "--verify=crc32c", "--do_verify=0"]);
    assert!(ok && job["error"] == 0, "{stderr}\n{job}");
    let (ok, job, stderr) = fio(&uri, &["--rw=randwrite", "--size=16M", "--verify=crc32c", "--verify_only"]);
    assert!(ok && job["error"] == 0, "data written by one fio run verifies in the next: {stderr}\n{job}");

    // The verification is real: on an export that was never written it fails.
    let fresh = Server::memory("disk", "64MiB");
    let (ok, _, stderr) =
        fio(&fresh.uri("disk"), &["--rw=randwrite", "--size=16M", "--verify=crc32c", "--verify_only"]);
    assert!(!ok && stderr.contains("verify"), "fio must notice data that was never written: {stderr}");
}

#[test]
fn fio_trims_and_trim_then_write_workloads_report_no_errors() {
    require!(FIO);
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    common::empty_image(&image, 64 * MIB);
    let server = Server::builder().export("mem", "memory:64MiB").export("file", &image).start();
    for export in ["mem", "file"] {
        let uri = server.uri(export);
        let (ok, job, stderr) = fio(&uri, &["--rw=randtrim", "--bs=64k", "--size=32M"]);
        assert!(ok && job["error"] == 0, "{export}: fio randtrim: {stderr}\n{job}");
        assert_eq!(job["trim"]["io_bytes"], 32 * MIB, "{job}");
        // fio submits a block's TRIM and WRITE together; NBD does not order them, so the
        // verifying run has one request in flight.
        let args = ["--rw=trimwrite", "--bs=64k", "--size=16M", "--iodepth=1", "--verify=crc32c"];
        let (ok, job, stderr) = fio(&uri, &args);
        assert!(ok && job["error"] == 0, "{export}: fio trimwrite with verify: {stderr}\n{job}");
    }
}
