//! Refuses what a web page in the user's browser could make the browser send to the control API:
//!
//! * **cross-site request forgery**: any page may make the browser send a "simple" `POST` (a form,
//!   `fetch(..., {mode: "no-cors"})`) to `http://127.0.0.1:10810/...`. The page cannot read the
//!   answer, but the request is done: a trigger armed, a policy removed, an export reset. A request
//!   that changes state (any method but `GET` and `HEAD`) is refused when its `Origin` is not this
//!   server's own or its `Sec-Fetch-Site` says it came from another origin. curl, `nbdfault ctl`
//!   and the typed client send neither header; the live page sends its own origin.
//! * **DNS rebinding**: a page at `http://evil.example:10810/` whose name then resolves to
//!   127.0.0.1 is same-origin with the API as far as the browser knows, and may read the answers
//!   too. Its requests carry `Host: evil.example:10810`. On a loopback listener, a request is
//!   answered only when its `Host` is an IP address or `localhost`: names a rebinding page cannot
//!   use (a page whose origin is an IP address was served from that address, that is, by this
//!   server).
//!
//! docs/security.md says the same for users.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::ApiError;

/// What the guard knows of the listener it stands in front of.
#[derive(Clone, Copy, Debug)]
pub(super) struct Guard {
    /// The listener's address is a loopback one: only IP addresses and localhost names may be
    /// the `Host` (a listener on `0.0.0.0` or a host's address is reached under names it cannot
    /// know; the token guards it).
    pub loopback: bool,
}

pub(super) async fn guard(State(guard): State<Guard>, request: Request, next: Next) -> Response {
    if let Err(refusal) = check(guard, request.method(), request.headers()) {
        return ApiError::new(StatusCode::FORBIDDEN, refusal).into_response();
    }
    next.run(request).await
}

/// Why a request is refused, or nothing.
fn check(guard: Guard, method: &Method, headers: &HeaderMap) -> Result<(), String> {
    let host = headers.get(header::HOST).map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned());
    if guard.loopback
        && let Some(host) = &host
        && !rebinding_safe(host)
    {
        return Err(format!(
            "the request is addressed to Host {host:?}: this control API listens on loopback and answers only \
             requests addressed to an IP address or localhost (a web page that made its own name resolve to \
             127.0.0.1, DNS rebinding, would send its name); use http://127.0.0.1:PORT/ or http://localhost:PORT/"
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

    const LOOPBACK: Guard = Guard { loopback: true };

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
    fn a_loopback_listener_refuses_a_foreign_host_even_for_reads() {
        let error = check(LOOPBACK, &Method::GET, &headers(&[("host", "evil.example:10810")])).unwrap_err();
        assert!(error.contains("\"evil.example:10810\"") && error.contains("DNS rebinding"), "{error}");
        check(Guard { loopback: false }, &Method::GET, &headers(&[("host", "nbdfault:10810")])).unwrap();
    }

    #[test]
    fn writes_from_another_origin_are_refused_and_those_without_origin_or_from_the_same_pass() {
        let host = ("host", "127.0.0.1:10810");
        check(LOOPBACK, &Method::POST, &headers(&[host])).unwrap();
        check(LOOPBACK, &Method::POST, &headers(&[host, ("origin", "http://127.0.0.1:10810")])).unwrap();
        check(LOOPBACK, &Method::DELETE, &headers(&[host, ("sec-fetch-site", "same-origin")])).unwrap();
        for refused in [
            vec![host, ("origin", "http://127.0.0.1:8080")],
            vec![host, ("origin", "null")],
            vec![host, ("origin", "https://evil.example")],
            vec![host, ("sec-fetch-site", "same-site")],
            vec![host, ("sec-fetch-site", "cross-site"), ("origin", "http://127.0.0.1:10810")],
        ] {
            let error = check(LOOPBACK, &Method::POST, &headers(&refused)).unwrap_err();
            assert!(error.contains("cross-site request forgery"), "{refused:?}: {error}");
        }
        // Reads are not refused for their origin: another origin cannot read the answer.
        check(LOOPBACK, &Method::GET, &headers(&[host, ("origin", "http://evil.example")])).unwrap();
    }
}
