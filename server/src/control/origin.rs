//! Refuses what a web page in the user's browser could make the browser send to the control API:
//!
//! * **cross-site request forgery**: any page may make the browser send a "simple" `POST` (a form,
//!   `fetch(..., {mode: "no-cors"})`) to `http://127.0.0.1:10810/...`. The page cannot read the
//!   answer, but the request is done: a trigger armed, a policy removed, an export reset. A request
//!   that changes state (any method but `GET` and `HEAD`) is refused when its `Origin` is not this
//!   server's own or its `Sec-Fetch-Site` says it came from another origin. curl, `nbdfault ctl`
//!   and the typed client send neither header; the live page sends its own origin.
//! * **DNS rebinding**: a page at `http://evil.example:10810/` whose name then resolves to
//!   127.0.0.1 (or to the address the API listens on) is same-origin with the API as far as the
//!   browser knows, and may read the answers too. Its requests carry `Host: evil.example:10810`.
//!   A request is answered only when its `Host` is an IP address, `localhost`, or a name the
//!   operator allowed (`--control-allow-host`): names a rebinding page cannot use (a page whose
//!   origin is an IP address was served from that address, that is, by this server).
//!
//! docs/security.md says the same for users.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

use super::ApiError;

/// What the guard lets in besides IP addresses and localhost names.
#[derive(Clone, Debug, Default)]
pub(super) struct Guard {
    /// Host names (lower case, without port or final dot) the server may be addressed as: a
    /// container's service name, a host's name (`--control-allow-host`).
    pub allowed_hosts: Arc<[String]>,
}

pub(super) async fn guard(State(guard): State<Guard>, request: Request, next: Next) -> Response {
    if let Err(refusal) = check(&guard, request.method(), request.headers()) {
        // Read what the client still sends first: closing on it would reset the connection
        // under a client still writing, which then sees no answer (or, on a kept-alive
        // connection, the next request fails).
        super::drain(request.into_body()).await;
        return ApiError::new(StatusCode::FORBIDDEN, refusal).into_response();
    }
    next.run(request).await
}

/// Why a request is refused, or nothing.
fn check(guard: &Guard, method: &Method, headers: &HeaderMap) -> Result<(), String> {
    // HTTP/1.1 only (the server speaks no HTTP/2): the authority is in `Host`. A request without
    // one (HTTP/1.0) comes from no browser.
    let host = headers.get(header::HOST).map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned());
    if let Some(host) = &host
        && !rebinding_safe(host)
        && !allowed(&guard.allowed_hosts, host)
    {
        return Err(format!(
            "the request is addressed to Host {host:?}: this control API answers only requests addressed to an IP \
             address, localhost, or a name given with --control-allow-host (a web page that made its own name \
             resolve to this server, DNS rebinding, would send its name); use http://127.0.0.1:PORT/ or \
             http://localhost:PORT/, or start the server with --control-allow-host NAME"
        ));
    }
    if matches!(*method, Method::GET | Method::HEAD) {
        return Ok(());
    }
    let why = "a web page from another origin may not change this server's state (cross-site request forgery); \
               curl, `nbdfault ctl` and the control client send no Origin, the live page sends its own";
    if let Some(site) = headers.get("sec-fetch-site") {
        let site = String::from_utf8_lossy(site.as_bytes());
        if !matches!(&*site, "same-origin" | "none") {
            return Err(format!(
                "refused {method}: the browser says it comes from another origin (Sec-Fetch-Site: {site}); {why}"
            ));
        }
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = String::from_utf8_lossy(origin.as_bytes()).into_owned();
        let authority = origin.split_once("://").map(|(_, authority)| authority);
        let same = match (authority, &host) {
            (Some(authority), Some(host)) => authority.eq_ignore_ascii_case(host),
            _ => false,
        };
        if !same {
            let host = host.as_deref().unwrap_or("(none)");
            return Err(format!("refused {method}: Origin {origin} is not this server (Host {host}); {why}"));
        }
    }
    Ok(())
}

/// `host` (with or without port) is one of the names the operator allowed.
fn allowed(names: &[String], host: &str) -> bool {
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|byte| byte.is_ascii_digit()) => name,
        _ => host,
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    names.iter().any(|allowed| allowed.eq_ignore_ascii_case(name))
}

/// Checks and normalizes a name for `--control-allow-host`: a DNS name (letters, digits, `-`,
/// `.`), without scheme or port; lower case, without a final dot.
pub fn allowed_host_name(text: &str) -> Result<String, String> {
    let name = text.trim().strip_suffix('.').unwrap_or(text.trim()).to_ascii_lowercase();
    let label_ok = |label: &str| {
        !label.is_empty() && label.len() <= 63 && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(format!(
            "control allowed host `{text}` is not a host name: give a name such as `nbdfault` or \
             `test-box.example.com`, without scheme or port (IP addresses and localhost need no allowing)"
        ));
    }
    Ok(name)
}

/// A `Host` a DNS-rebinding page cannot send: an IP address (with or without port), `localhost`
/// or a name under `.localhost` (which browsers resolve to loopback themselves, never by DNS).
fn rebinding_safe(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        // `[v6]` or `[v6]:port`
        Some(rest) => return rest.split_once(']').is_some_and(|(ip, _)| ip.parse::<std::net::Ipv6Addr>().is_ok()),
        None => match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|byte| byte.is_ascii_digit()) => name,
            _ => host,
        },
    };
    if name.parse::<std::net::Ipv4Addr>().is_ok() {
        return true;
    }
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    name == "localhost" || name.ends_with(".localhost")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, value.parse().unwrap());
        }
        map
    }

    fn none() -> Guard {
        Guard::default()
    }

    #[test]
    fn ip_addresses_and_localhost_names_are_hosts_a_rebinding_page_cannot_send() {
        for host in [
            "127.0.0.1:10810",
            "127.0.0.1",
            "10.0.2.2:1234",
            "[::1]:10810",
            "[::1]",
            "localhost:10810",
            "LocalHost.",
            "app.localhost:1",
        ] {
            assert!(rebinding_safe(host), "{host}");
        }
        for host in [
            "evil.example:10810",
            "evil.example",
            "127.0.0.1.evil.example:80",
            "localhost.evil.example",
            "[::1",
            "1.2.3:80",
            "",
            "[evil]:1",
        ] {
            assert!(!rebinding_safe(host), "{host}");
        }
    }

    #[test]
    fn a_foreign_host_is_refused_even_for_reads_unless_allowed() {
        let error = check(&none(), &Method::GET, &headers(&[("host", "evil.example:10810")])).unwrap_err();
        assert!(error.contains("\"evil.example:10810\"") && error.contains("DNS rebinding"), "{error}");
        assert!(error.contains("--control-allow-host"), "{error}");
        let named = Guard { allowed_hosts: Arc::from(vec!["nbdfault".to_string()]) };
        for host in ["nbdfault:10810", "NBDfault", "nbdfault.:1"] {
            check(&named, &Method::GET, &headers(&[("host", host)])).unwrap();
        }
        for host in ["nbdfault.evil.example:10810", "evil.example", "nbdfault:x"] {
            check(&named, &Method::GET, &headers(&[("host", host)])).unwrap_err();
        }
        // The allowed name is this server's own origin too.
        let own = [("host", "nbdfault:10810"), ("origin", "http://nbdfault:10810")];
        check(&named, &Method::POST, &headers(&own)).unwrap();
    }

    #[test]
    fn allowed_host_names_are_dns_names_without_port_in_lower_case() {
        assert_eq!(allowed_host_name("NBDfault.").unwrap(), "nbdfault");
        assert_eq!(allowed_host_name(" test-box.example.com ").unwrap(), "test-box.example.com");
        for bad in ["", ".", "nbdfault:10810", "http://nbdfault", "a..b", "*.example", "under_score"] {
            let error = allowed_host_name(bad).unwrap_err();
            assert!(error.contains("is not a host name"), "{bad}: {error}");
        }
    }

    #[test]
    fn writes_from_another_origin_are_refused_and_those_without_origin_or_from_the_same_pass() {
        let host = ("host", "127.0.0.1:10810");
        check(&none(), &Method::POST, &headers(&[host])).unwrap();
        check(&none(), &Method::POST, &headers(&[host, ("origin", "http://127.0.0.1:10810")])).unwrap();
        check(&none(), &Method::DELETE, &headers(&[host, ("sec-fetch-site", "same-origin")])).unwrap();
        for refused in [
            vec![host, ("origin", "http://127.0.0.1:8080")],
            vec![host, ("origin", "null")],
            vec![host, ("origin", "https://evil.example")],
            vec![host, ("sec-fetch-site", "same-site")],
            vec![host, ("sec-fetch-site", "cross-site"), ("origin", "http://127.0.0.1:10810")],
        ] {
            let error = check(&none(), &Method::POST, &headers(&refused)).unwrap_err();
            assert!(error.contains("cross-site request forgery"), "{refused:?}: {error}");
        }
        // Reads are not refused for their origin: another origin cannot read the answer.
        check(&none(), &Method::GET, &headers(&[host, ("origin", "http://evil.example")])).unwrap();
    }
}
