//! TLS with real clients: libnbd (`nbds://` URIs, nbdinfo, nbdcopy) and qemu (`tls-creds-x509`)
//! against the real server with `--tls on|require`, client certificates with
//! `--tls-verify-peer`, plain clients refused under `require`, clear start-up errors for bad
//! certificate files, and the control API over HTTPS (curl and `nbdfault ctl`).
//!
//! Certificates are made at test time (common/pki.rs).

mod common;

use std::path::Path;

use common::pki::{Pki, write};
use common::raw::RawClient;
use common::{
    CURL, NBDCOPY, NBDFAULT, NBDINFO, QEMU_IMG, QEMU_IO, Server, ServerBuilder, assert_same_bytes, random_bytes,
    require, run, run_ok,
};

const OPT_STARTTLS: u32 = 5;
const OPT_GO: u32 = 7;
const OPT_LIST: u32 = 3;
const OPT_INFO: u32 = 6;
const OPT_ABORT: u32 = 2;
const REP_ACK: u32 = 1;
const REP_ERR_POLICY: u32 = 0x8000_0002;
const REP_ERR_TLS_REQD: u32 = 0x8000_0005;

fn tls_server(pki: &Pki, mode: &str) -> ServerBuilder {
    Server::builder().export("disk", "memory:64MiB").arg("--tls").arg(mode).arg("--tls-certificates").arg(&pki.dir)
}

/// `nbds://127.0.0.1:PORT/EXPORT?tls-certificates=DIR`: libnbd checks the server's certificate
/// against DIR/ca-cert.pem and the address, and presents DIR/client-cert.pem when there is one.
fn nbds(server: &Server, export: &str, certificates: &Path) -> String {
    format!("nbds://{}/{export}?tls-certificates={}", server.nbd, certificates.display())
}

fn nbdinfo(uri: &str) -> std::process::Output {
    run(NBDINFO.command().arg("--json").arg(uri))
}

#[test]
fn nbdinfo_and_nbdcopy_move_data_over_nbds_when_tls_is_required() {
    require!(NBDCOPY, NBDINFO);
    let pki = Pki::new();
    let server = tls_server(&pki, "require").start();
    let uri = nbds(&server, "disk", &pki.dir);
    let info = common::json(&run_ok(NBDINFO.command().arg("--json").arg(&uri)));
    assert_eq!(info["exports"][0]["export-size"], 64 << 20, "{info}");
    assert_eq!(info["TLS"], true, "nbdinfo does not report TLS: {info}");

    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source.img");
    let back = dir.path().join("back.img");
    let data = random_bytes(8 << 20);
    std::fs::write(&source, &data).unwrap();
    run_ok(NBDCOPY.command().arg(&source).arg(&uri));
    run_ok(NBDCOPY.command().arg(&uri).arg(&back));
    let copied = std::fs::read(&back).unwrap();
    assert_same_bytes(&copied[..data.len()], &data, "the image copied in and out over TLS");
    assert!(server.stderr().contains("tls=true"), "the server does not log the TLS attachment");
}

#[test]
fn require_refuses_plain_clients_with_err_tls_reqd() {
    require!(NBDINFO);
    let pki = Pki::new();
    let server = tls_server(&pki, "require").start();
    let plain = nbdinfo(&server.uri("disk"));
    assert!(!plain.status.success(), "a plain nbdinfo attached to a server that requires TLS");

    // Option by option: LIST, INFO and GO get ERR_TLS_REQD, ABORT is acknowledged.
    let mut client = RawClient::start(server.nbd, 3);
    for option in [OPT_LIST, OPT_INFO, OPT_GO] {
        let data = if option == OPT_LIST { Vec::new() } else { common::raw::info_data("disk", &[]) };
        client.send_option(option, &data);
        let reply = client.read_option_reply();
        assert_eq!((reply.option, reply.reply_type), (option, REP_ERR_TLS_REQD), "option {option}");
    }
    client.send_option(OPT_ABORT, &[]);
    assert_eq!(client.read_option_reply().reply_type, REP_ACK);

    // EXPORT_NAME cannot fail: the server hangs up.
    let mut client = RawClient::start(server.nbd, 3);
    client.send_option(1, b"disk");
    assert!(client.closed_by_server(), "EXPORT_NAME before STARTTLS was not refused by closing");
}

#[test]
fn on_lets_clients_choose_plain_text_or_tls() {
    require!(NBDCOPY);
    let pki = Pki::new();
    let server = tls_server(&pki, "on").start();
    let data = random_bytes(1 << 20);
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source.img");
    std::fs::write(&source, &data).unwrap();
    run_ok(NBDCOPY.command().arg(&source).arg(nbds(&server, "disk", &pki.dir)));
    let back = dir.path().join("back.img");
    run_ok(NBDCOPY.command().arg(server.uri("disk")).arg(&back));
    assert_same_bytes(&std::fs::read(&back).unwrap()[..data.len()], &data, "written over TLS, read in plain text");
}

#[test]
fn without_tls_starttls_is_refused_by_policy() {
    let server = Server::memory("disk", "1MiB");
    let mut client = RawClient::start(server.nbd, 3);
    client.send_option(OPT_STARTTLS, &[]);
    let reply = client.read_option_reply();
    assert_eq!(reply.reply_type, REP_ERR_POLICY, "{:?}", String::from_utf8_lossy(&reply.data));
    assert!(String::from_utf8_lossy(&reply.data).contains("--tls"));
    client.go("disk");
}

#[test]
fn the_server_certificate_is_checked_by_the_client() {
    require!(NBDINFO);
    let pki = Pki::new();
    let server = tls_server(&pki, "require").start();
    // A client that trusts another CA refuses the server.
    let other = tempfile::tempdir().unwrap();
    write(other.path(), "ca-cert.pem", &common::pki::Authority::new("another CA").cert_pem());
    let refused = nbdinfo(&nbds(&server, "disk", other.path()));
    assert!(!refused.status.success(), "libnbd accepted a server certificate from a CA it does not trust");
}

#[test]
fn verify_peer_admits_only_clients_with_a_certificate_from_the_ca() {
    require!(NBDINFO);
    let pki = Pki::new();
    let server = tls_server(&pki, "require").arg("--tls-verify-peer").start();
    run_ok(NBDINFO.command().arg(nbds(&server, "disk", &pki.dir)));
    let anonymous = nbdinfo(&nbds(&server, "disk", &pki.anonymous_client()));
    assert!(!anonymous.status.success(), "a client without a certificate attached under --tls-verify-peer");
    let stranger = nbdinfo(&nbds(&server, "disk", &pki.stranger_client()));
    assert!(!stranger.status.success(), "a client certificate from another CA was accepted");
    assert!(server.stderr().contains("TLS handshake after STARTTLS failed"), "{}", server.stderr());
}

#[test]
fn qemu_io_and_qemu_img_work_with_tls_creds_x509() {
    require!(QEMU_IMG, QEMU_IO);
    let pki = Pki::new();
    let server = tls_server(&pki, "require").arg("--tls-verify-peer").start();
    let object = format!("tls-creds-x509,id=tls0,endpoint=client,dir={}", pki.dir.display());
    let image = format!("driver=nbd,host=127.0.0.1,port={},export=disk,tls-creds=tls0", server.port());
    let output = run_ok(QEMU_IO.command().args([
        "--object",
        &object,
        "--image-opts",
        &image,
        "-c",
        "write -P 0x5a 1M 256k",
        "-c",
        "flush",
        "-c",
        "read -P 0x5a 1M 256k",
        "-c",
        "read -P 0 0 1M",
    ]));
    assert!(!output.contains("Pattern verification failed"), "{output}");
    let info = run_ok(QEMU_IMG.command().args(["info", "--output=json", "--object", &object, "--image-opts", &image]));
    assert_eq!(common::json(&info)["virtual-size"], 64 << 20, "{info}");
}

/// `nbdfault serve` with TLS settings that cannot work: exits 2 naming the file.
fn start_error(pki_dir: &Path, extra: &[&str]) -> String {
    let mut command =
        Server::builder().arg("--tls").arg("require").arg("--tls-certificates").arg(pki_dir).args(extra).command();
    let output = run(&mut command);
    assert_eq!(output.status.code(), Some(2), "the server started with bad TLS files");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn missing_or_bad_certificate_files_stop_the_server_with_the_file_named() {
    let pki = Pki::new();
    let missing = start_error(&pki.dir.join("nope"), &[]);
    assert!(missing.contains("nope") && missing.contains("not a directory"), "{missing}");

    std::fs::remove_file(pki.path("ca-cert.pem")).unwrap();
    let no_ca = start_error(&pki.dir, &["--tls-verify-peer"]);
    assert!(no_ca.contains("ca-cert.pem is missing") && no_ca.contains("--tls-verify-peer"), "{no_ca}");

    std::fs::write(pki.path("server-key.pem"), "not a key\n").unwrap();
    let garbage = start_error(&pki.dir, &[]);
    assert!(garbage.contains("server-key.pem holds no private key"), "{garbage}");

    let (_, other_key) = pki.authority.issue("other", &["localhost"], false);
    write(&pki.dir, "server-key.pem", &other_key);
    let mismatch = start_error(&pki.dir, &[]);
    assert!(
        mismatch.contains("server-key.pem") && mismatch.contains("is it the key of that certificate"),
        "{mismatch}"
    );

    std::fs::write(pki.path("server-cert.pem"), pki.authority.cert_pem().replace("MII", "!!!")).unwrap();
    let bad_pem = start_error(&pki.dir, &[]);
    assert!(bad_pem.contains("server-cert.pem"), "{bad_pem}");

    std::fs::remove_file(pki.path("server-cert.pem")).unwrap();
    let no_cert = start_error(&pki.dir, &[]);
    assert!(no_cert.contains("server-cert.pem is missing"), "{no_cert}");
}

#[test]
fn the_control_api_is_served_over_https_with_the_same_certificates() {
    require!(CURL);
    let pki = Pki::new();
    let server = tls_server(&pki, "require").with_control().start();
    let control = server.control.expect("control address");
    let url = format!("https://{control}");
    let health = run_ok(
        CURL.command().args(["-sS", "--fail", "--cacert"]).arg(pki.path("ca-cert.pem")).arg(format!("{url}/v1/health")),
    );
    assert!(health.contains("\"ok\""), "{health}");
    let plain =
        run(CURL.command().args(["-sS", "--fail", "--max-time", "10"]).arg(format!("http://{control}/v1/health")));
    assert!(!plain.status.success(), "the control API answered plain HTTP while TLS is on");

    // nbdfault ctl: with the CA it talks; without it, it refuses the unknown certificate.
    let exports = run_ok(
        std::process::Command::new(NBDFAULT)
            .args(["ctl", "--url", &url, "--tls-certificates"])
            .arg(&pki.dir)
            .args(["exports", "disk"]),
    );
    assert!(exports.contains("\"disk\""), "{exports}");
    let untrusted = run(std::process::Command::new(NBDFAULT).args(["ctl", "--url", &url, "health"]));
    assert!(!untrusted.status.success(), "ctl trusted a certificate it has no CA for");
    let with_env = run_ok(
        std::process::Command::new(NBDFAULT)
            .env("NBDFAULT_CONTROL_URL", &url)
            .env("NBDFAULT_CONTROL_TLS_CERTIFICATES", &pki.dir)
            .args(["ctl", "health"]),
    );
    assert!(with_env.contains("\"ok\""), "{with_env}");
}

#[test]
fn with_verify_peer_the_control_api_wants_a_client_certificate_too() {
    let pki = Pki::new();
    let server = tls_server(&pki, "require").arg("--tls-verify-peer").with_control().start();
    let url = format!("https://{}", server.control.expect("control address"));
    let ctl = |dir: &Path| {
        run(std::process::Command::new(NBDFAULT)
            .args(["ctl", "--url", &url, "--tls-certificates"])
            .arg(dir)
            .arg("health"))
    };
    assert!(ctl(&pki.dir).status.success(), "ctl with the client certificate was refused");
    assert!(!ctl(&pki.anonymous_client()).status.success(), "ctl without a client certificate was let in");
    assert!(!ctl(&pki.stranger_client()).status.success(), "ctl with a stranger's certificate was let in");
}
