//! The live page in a real browser: headless Chromium, driven by Selenium, opens the page of a
//! server with a control token while qemu-io writes into a failing range; and pages of other
//! origins or names try to use the API of a server without a token (`python/page_check.py` says
//! what it checks). The screenshot lands in the test output.

mod common;

use common::control::Api;
use common::{CHROMEDRIVER, CHROMIUM, PYTHON, PYTHON_SELENIUM, QEMU_IO, Server, python_script, require, run};

const POLICY: &str =
    "rules: [{name: fail-armed, when: {op: write, range: 1MiB..2MiB, armed_by: go}, then: {error: EIO}}]";

/// Runs `page_check.py ARGS...`, which must succeed; returns what it printed.
fn page_check(args: &[&str], server: &Server) -> String {
    let output = run(std::process::Command::new(PYTHON).arg(python_script("page_check.py")).args(args));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "page_check.py: {stdout}\n{stderr}\nserver: {}", server.stderr());
    eprintln!("{}", stdout.trim());
    stdout
}

#[test]
fn the_page_draws_a_failed_write_in_red_on_labelled_axes_shows_its_request_arms_triggers_and_counts_hits() {
    require!(CHROMIUM, CHROMEDRIVER, PYTHON_SELENIUM, QEMU_IO);
    let server =
        Server::builder().export("disk", "memory:16MiB").args(["--control-token", "s3cret"]).with_control().start();
    let api = Api::new(&server).with_token("s3cret");
    api.set_policy("disk", POLICY);
    // The page's files need no token; the API behind them does.
    let anonymous = Api::new(&server);
    let page = anonymous.get("/").expect(200);
    assert!(page.text().contains("<canvas id=\"map\""));
    assert!(page.headers["content-security-policy"].contains("script-src 'self'"), "{:?}", page.headers);
    anonymous.get("/page/app.js").expect(200);
    assert_eq!(anonymous.get("/v1/exports").status, 401);

    let screenshot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("live-page.png");
    let _ = std::fs::remove_file(&screenshot);
    let url = format!("http://{}/?export=disk#token=s3cret", server.control.unwrap());
    page_check(&["page", &url, &server.uri("disk"), &screenshot.to_string_lossy()], &server);
    let png = std::fs::read(&screenshot).expect("the screenshot");
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    eprintln!("screenshot: {}", screenshot.display());
}

#[test]
fn pages_of_another_origin_or_name_cannot_arm_a_trigger_or_read_the_api_of_a_server_without_token() {
    require!(CHROMIUM, CHROMEDRIVER, PYTHON_SELENIUM);
    // Without a token, only the checks of Origin and Host keep other pages out.
    let server = Server::builder().export("disk", "memory:16MiB").with_control().start();
    let api = Api::new(&server);
    api.set_policy("disk", POLICY);
    page_check(&["other-pages", &server.control.unwrap().to_string()], &server);
    let export = api.export("disk");
    assert!(export["triggers"].as_array().unwrap().iter().all(|trigger| trigger["armed"] == false), "{export}");
}
