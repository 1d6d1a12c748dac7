//! `vm-tls`: the kernel's own client over TLS. Boots a Debian kernel in qemu with Debian's
//! nbd-client (GnuTLS) and attaches to `nbdfault serve --tls require --tls-verify-peer`:
//! a plain attach must be refused, an attach with `-enable-tls` and a client certificate must
//! work, and a pattern written through `/dev/nbd0` must read back in the guest and be in the
//! server's image file on the host afterwards.
//!
//! The certificates are made for the run with `openssl` (Debian package openssl), in a temporary
//! directory: the CA, the server's (valid for the address the guest dials, 10.0.2.2) and the
//! client's.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use clap::Args;

use super::check::{Check, CheckArgs, GUEST_DIR, init_preamble};
use super::guest::HOST_FROM_GUEST;

/// Bytes the guest writes through the device and reads back.
const PATTERN_LEN: usize = 4 << 20;

/// Arguments of `vm-tls`.
#[derive(Args, Debug)]
pub struct TlsArgs {
    #[command(flatten)]
    pub check: CheckArgs,
}

/// Console lines of the check start with this.
const MARK: &str = "tls-check: ";

/// The guest's `/init` for the check.
pub fn init_script() -> String {
    let tls = format!(
        "-enable-tls -cacertfile {GUEST_DIR}/ca-cert.pem -certfile {GUEST_DIR}/client-cert.pem \
         -keyfile {GUEST_DIR}/client-key.pem -tlshostname {HOST_FROM_GUEST}"
    );
    let steps = format!(
        r#"if nbd-client {HOST_FROM_GUEST} "$port" /dev/nbd0 -N disk -b 4096 -t 30 >/tmp/plain.log 2>&1; then
    say "plain attached"
    nbd-client -d /dev/nbd0 >/dev/null 2>&1
else
    say "plain refused: $(tail -n 1 /tmp/plain.log)"
fi
if nbd-client {HOST_FROM_GUEST} "$port" /dev/nbd0 -N disk -b 4096 -t 30 {tls} >/tmp/tls.log 2>&1; then
    say "tls attached"
    dd if={GUEST_DIR}/pattern.bin of=/dev/nbd0 bs=1M oflag=direct conv=fsync 2>/dev/null || say "write failed"
    echo 3 >/proc/sys/vm/drop_caches
    dd if=/dev/nbd0 of=/tmp/back.bin bs=1M count={mib} iflag=direct 2>/dev/null || say "read failed"
    if cmp {GUEST_DIR}/pattern.bin /tmp/back.bin >/dev/null; then say "data ok"; else say "data differs"; fi
    nbd-client -d /dev/nbd0 >/dev/null 2>&1
else
    say "tls refused: $(tail -n 3 /tmp/tls.log | tr '\n' ' ')"
fi
say "done"
poweroff -f
"#,
        mib = PATTERN_LEN >> 20
    );
    init_preamble(MARK) + &steps
}

fn openssl(dir: &Path, args: &[&str]) -> Result<(), String> {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .map_err(|e| format!("cannot run openssl (install the Debian package openssl): {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!("openssl {}: {}", args.join(" "), String::from_utf8_lossy(&output.stderr)))
    }
}

/// A CA, a server certificate for `names` and a client certificate, in nbdkit's layout.
pub fn make_certificates(dir: &Path, names: &str) -> Result<(), String> {
    std::fs::write(dir.join("server.ext"), format!("subjectAltName={names}\nextendedKeyUsage=serverAuth\n"))
        .and_then(|()| std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n"))
        .map_err(|e| format!("cannot write into {}: {e}", dir.display()))?;
    let key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    let mut ca = vec!["req", "-x509"];
    ca.extend(key);
    ca.extend(["-days", "2", "-subj", "/CN=nbdfault vm-tls CA", "-keyout", "ca-key.pem", "-out", "ca-cert.pem"]);
    ca.extend(["-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=keyCertSign,cRLSign"]);
    openssl(dir, &ca)?;
    for who in ["server", "client"] {
        let (keyout, csr, cert, ext) =
            (format!("{who}-key.pem"), format!("{who}.csr"), format!("{who}-cert.pem"), format!("{who}.ext"));
        let subject = format!("/CN=nbdfault vm-tls {who}");
        let mut request = vec!["req"];
        request.extend(key);
        request.extend(["-subj", &subject, "-keyout", &keyout, "-out", &csr]);
        openssl(dir, &request)?;
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca-cert.pem",
                "-CAkey",
                "ca-key.pem",
                "-days",
                "2",
                "-out",
                &cert,
                "-extfile",
                &ext,
            ],
        )?;
    }
    Ok(())
}

/// What the guest reported, from its console lines.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Findings {
    pub lines: Vec<String>,
}

impl Findings {
    fn has(&self, prefix: &str) -> bool {
        self.lines.iter().any(|line| line.starts_with(prefix))
    }

    /// Every failed expectation, in words.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if !self.has("plain refused") {
            problems.push("nbd-client without TLS was not refused by a server that requires TLS".to_string());
        }
        if !self.has("tls attached") {
            problems.push("nbd-client with -enable-tls and a client certificate could not attach".to_string());
        } else if !self.has("data ok") {
            problems.push("the pattern written through /dev/nbd0 over TLS did not read back the same".to_string());
        }
        if !self.has("done") {
            problems.push("the guest did not finish the check".to_string());
        }
        problems
    }
}

/// `vm-tls`: everything, start to finish.
pub fn main(args: TlsArgs) -> Result<ExitCode, String> {
    let check = Check::prepare(&args.check)?;
    let temp = &check.temp.0;
    let pki = temp.join("pki");
    std::fs::create_dir_all(&pki).map_err(|e| format!("cannot make {}: {e}", pki.display()))?;
    make_certificates(&pki, &format!("IP:{HOST_FROM_GUEST},IP:127.0.0.1,DNS:localhost"))?;
    let pattern: Vec<u8> =
        (0..PATTERN_LEN).map(|i| (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15).to_be_bytes()[0]).collect();
    let pattern_path = temp.join("pattern.bin");
    std::fs::write(&pattern_path, &pattern).map_err(|e| format!("cannot write the pattern: {e}"))?;
    check.progress.say("certificates made with openssl (CA, server for 10.0.2.2, client)");

    let guest_file = |name: &str| format!("{GUEST_DIR}/{name}");
    let names = ["ca-cert.pem", "client-cert.pem", "client-key.pem"];
    let guest_paths: Vec<String> = names.iter().map(|n| guest_file(n)).chain([guest_file("pattern.bin")]).collect();
    let host_paths: Vec<PathBuf> = names.iter().map(|n| pki.join(n)).chain([pattern_path.clone()]).collect();
    let files: Vec<(&str, PathBuf)> = guest_paths.iter().map(String::as_str).zip(host_paths).collect();

    let image = temp.join("disk.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(64 << 20))
        .map_err(|e| format!("cannot make {}: {e}", image.display()))?;
    let exports = [("disk".to_string(), format!("file:{}", image.display()))];
    let pki_arg = pki.display().to_string();
    let extra = ["--tls", "require", "--tls-certificates", &pki_arg, "--tls-verify-peer"];
    let log = temp.join("server.log");
    let server =
        super::server::Server::start_with(&check.server_binary, &exports, &extra, &log).map_err(|e| e.to_string())?;
    check.progress.say(&format!("nbdfault serve --tls require --tls-verify-peer on {}", server.ready.nbd));

    let mut findings = Findings::default();
    check.boot(&init_script(), &files, server.ready.nbd.port(), MARK, &mut |text| {
        findings.lines.push(text.to_string());
    })?;
    let _ = server.stop();

    let mut problems = findings.problems();
    let stored = std::fs::read(&image).map_err(|e| format!("cannot read {}: {e}", image.display()))?;
    if findings.has("data ok") && stored.get(..PATTERN_LEN) != Some(&pattern[..]) {
        problems.push("the server's image does not hold the pattern the guest wrote over TLS".into());
    }
    let server_log = std::fs::read_to_string(&log).unwrap_or_default();
    if findings.has("tls attached") && !server_log.contains("tls=true") {
        problems.push("the server did not log a TLS attachment".into());
    }
    let passed = "nbd-client over TLS: plain refused, TLS with a client certificate attached, data intact";
    Ok(check.verdict(&problems, passed, &server_log))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_tries_plain_then_tls_with_the_client_certificate() {
        let init = init_script();
        let plain = init.find("-N disk -b 4096 -t 30 >/tmp/plain.log").expect("a plain attach");
        let tls = init.find("-enable-tls -cacertfile /etc/nbdfault/ca-cert.pem").expect("a TLS attach");
        assert!(plain < tls);
        assert!(init.contains("-certfile /etc/nbdfault/client-cert.pem -keyfile /etc/nbdfault/client-key.pem"));
        assert!(init.trim_end().ends_with("poweroff -f"));
    }

    #[test]
    fn every_missing_step_is_a_problem() {
        let all = |lines: &[&str]| Findings { lines: lines.iter().map(|l| l.to_string()).collect() }.problems();
        assert!(all(&["plain refused: x", "tls attached", "data ok", "done"]).is_empty());
        assert_eq!(all(&["plain attached", "tls attached", "data ok", "done"]).len(), 1);
        assert_eq!(all(&["plain refused", "tls attached", "data differs", "done"]).len(), 1);
        assert_eq!(all(&[]).len(), 3);
    }

    #[test]
    fn openssl_makes_certificates_in_nbdkits_layout() {
        nbdfault_testing::require!(nbdfault_testing::OPENSSL);
        let dir = std::env::temp_dir().join(format!("nbdfault-vm-tls-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        make_certificates(&dir, "IP:127.0.0.1").unwrap();
        for file in ["ca-cert.pem", "server-cert.pem", "server-key.pem", "client-cert.pem", "client-key.pem"] {
            let text = std::fs::read_to_string(dir.join(file)).unwrap();
            assert!(text.starts_with("-----BEGIN "), "{file}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
