//! Address forms used by the policy: listen (`ip:port`), target (`host:port`), relay host,
//! and relay port ranges.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// Why an address did not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AddrError {
    /// Not of the expected form at all (code E0013).
    Malformed(String),
    /// The port is 0 or above 65535 (code E0014).
    Port(String),
}

fn split_host_port(s: &str) -> Result<(&str, &str), AddrError> {
    if let Some(rest) = s.strip_prefix('[') {
        let Some((host, port)) = rest.split_once("]:") else {
            return Err(AddrError::Malformed(
                "an IPv6 address is written [address]:port".into(),
            ));
        };
        return Ok((host, port));
    }
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(AddrError::Malformed("no port: write address:port".into()));
    };
    if host.contains(':') {
        return Err(AddrError::Malformed(
            "an IPv6 address needs brackets: [address]:port".into(),
        ));
    }
    if host.is_empty() {
        return Err(AddrError::Malformed("no address before the port".into()));
    }
    Ok((host, port))
}

pub(crate) fn parse_port(port: &str) -> Result<u16, AddrError> {
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(AddrError::Malformed(format!(
            "the port `{port}` is not a number"
        )));
    }
    match port.parse::<u32>() {
        Ok(0) => Err(AddrError::Port(
            "port 0 cannot be used: pick a port from 1 to 65535".into(),
        )),
        Ok(n) if n <= 65535 => Ok(n as u16),
        _ => Err(AddrError::Port(format!(
            "port {port} is out of range: ports go from 1 to 65535"
        ))),
    }
}

/// A listen address: an IP literal (or `localhost`) and a port.
pub(crate) fn parse_listen(s: &str) -> Result<SocketAddr, AddrError> {
    let (host, port) = split_host_port(s)?;
    let ip = if host.eq_ignore_ascii_case("localhost") {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        host.parse::<IpAddr>().map_err(|_| {
            AddrError::Malformed(format!(
                "`{host}` is not an IP address (a portal listens on one of its own addresses, like 127.0.0.1)"
            ))
        })?
    };
    if s.starts_with('[') && ip.is_ipv4() {
        return Err(AddrError::Malformed(
            "brackets are for IPv6 addresses".into(),
        ));
    }
    Ok(SocketAddr::new(ip, parse_port(port)?))
}

/// A target: a host name or IP literal, and a port.
pub(crate) fn parse_target(s: &str) -> Result<(String, u16), AddrError> {
    let (host, port) = split_host_port(s)?;
    if s.starts_with('[') {
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(AddrError::Malformed(format!(
                "`{host}` is not an IPv6 address"
            )));
        }
    } else if host.parse::<Ipv4Addr>().is_err() {
        check_hostname(host)?;
    }
    Ok((host.to_string(), parse_port(port)?))
}

/// A relay address: a host name or IP literal, without a port.
pub(crate) fn check_relay_host(s: &str) -> Result<(), AddrError> {
    let inner = s
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .unwrap_or(s);
    if inner.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    if let Some((_, port)) = s.rsplit_once(':') {
        if port.bytes().all(|b| b.is_ascii_digit()) {
            return Err(AddrError::Malformed(
                "a relay address has no port: the relay's ports are set with `ports`".into(),
            ));
        }
        return Err(AddrError::Malformed(format!(
            "`{s}` is not a host name or IP address"
        )));
    }
    check_hostname(s)
}

/// A host as a comparable key: IP literals in canonical form (brackets dropped), names in
/// lower case without a trailing dot.
pub(crate) fn canonical_host(s: &str) -> String {
    let inner = s
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .unwrap_or(s);
    match inner.parse::<IpAddr>() {
        Ok(ip) => ip.to_string(),
        Err(_) => inner.trim_end_matches('.').to_ascii_lowercase(),
    }
}

fn check_hostname(host: &str) -> Result<(), AddrError> {
    let bad = || AddrError::Malformed(format!("`{host}` is not a valid host name or IP address"));
    if host.is_empty() || host.len() > 253 {
        return Err(bad());
    }
    // A dotted string of digits that did not parse as IPv4 is a mistyped address.
    if host
        .split('.')
        .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(bad());
    }
    for label in host.trim_end_matches('.').split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return Err(bad());
        }
    }
    Ok(())
}

/// A relay port range `FIRST-LAST`, with room for at least one pair.
pub(crate) fn parse_range(s: &str) -> Result<(u16, u16), AddrError> {
    let Some((a, b)) = s.split_once('-') else {
        return Err(AddrError::Malformed(
            "expected FIRST-LAST, like 40000-40999".into(),
        ));
    };
    let (a, b) = (a.trim(), b.trim());
    let first = parse_port(a)?;
    let last = parse_port(b)?;
    if first > last {
        return Err(AddrError::Malformed(format!(
            "the range starts at {first}, after its end {last}"
        )));
    }
    if first == last {
        return Err(AddrError::Malformed(
            "the range holds one port; a relay needs at least two (one pair)".into(),
        ));
    }
    Ok((first, last))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_forms() {
        assert!(parse_listen("127.0.0.1:2222").is_ok());
        assert!(parse_listen("[::1]:2222").is_ok());
        assert!(parse_listen("localhost:80").is_ok());
        assert!(matches!(
            parse_listen("127.0.0.1"),
            Err(AddrError::Malformed(_))
        ));
        assert!(matches!(
            parse_listen("::1:22"),
            Err(AddrError::Malformed(_))
        ));
        assert!(matches!(
            parse_listen("nas.lan:22"),
            Err(AddrError::Malformed(_))
        ));
        assert!(matches!(
            parse_listen("127.0.0.1:0"),
            Err(AddrError::Port(_))
        ));
        assert!(matches!(
            parse_listen("127.0.0.1:65536"),
            Err(AddrError::Port(_))
        ));
        assert!(matches!(
            parse_listen("127.0.0.1:ssh"),
            Err(AddrError::Malformed(_))
        ));
        assert!(matches!(
            parse_listen("[127.0.0.1]:22"),
            Err(AddrError::Malformed(_))
        ));
    }

    #[test]
    fn target_forms() {
        assert_eq!(parse_target("nas.lan:22"), Ok(("nas.lan".into(), 22)));
        assert!(parse_target("[fd00::1]:53").is_ok());
        assert!(parse_target("192.168.1.10:22").is_ok());
        assert!(matches!(
            parse_target("999.1.1.1:22"),
            Err(AddrError::Malformed(_))
        ));
        assert!(matches!(
            parse_target("-bad-:22"),
            Err(AddrError::Malformed(_))
        ));
        assert!(matches!(
            parse_target("host:99999"),
            Err(AddrError::Port(_))
        ));
    }

    #[test]
    fn relay_hosts_and_ranges() {
        assert!(check_relay_host("relay1.example.net").is_ok());
        assert!(check_relay_host("2001:db8::1").is_ok());
        assert!(check_relay_host("[2001:db8::1]").is_ok());
        assert!(check_relay_host("relay:4000").is_err());
        assert_eq!(parse_range("40000-40999"), Ok((40000, 40999)));
        assert!(matches!(parse_range("5-4"), Err(AddrError::Malformed(_))));
        assert!(matches!(parse_range("0-10"), Err(AddrError::Port(_))));
        assert!(matches!(parse_range("10-70000"), Err(AddrError::Port(_))));
        assert!(matches!(parse_range("10-10"), Err(AddrError::Malformed(_))));
    }
}
