//! Host names users ask a frontend to serve (a shared instance's `domain`).
//!
//! The frontend and the Master both read them: the frontend to route by
//! them, the Master before its CA certifies one. Both must agree on what a
//! name is and on its one spelling, or a domain could be claimed twice under
//! two spellings.

/// Checks a virtual host name and gives its one spelling: lowercase DNS
/// labels (letters, digits, `-`), no trailing dot. A `*.` wildcard, an empty
/// label and an IP address are refused.
pub fn check_domain(domain: &str) -> Result<String, String> {
    let d = domain.trim().trim_end_matches('.').to_ascii_lowercase();
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if d.is_empty() || d.len() > 253 || !d.split('.').all(label_ok) {
        return Err(format!(
            "domain {domain:?} is not a host name (letters, digits, '-', dots)"
        ));
    }
    if d.parse::<std::net::Ipv4Addr>().is_ok() {
        return Err(format!("domain {domain:?} is an address, not a host name"));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::check_domain;

    #[test]
    fn one_spelling_per_name_and_no_wildcards_or_addresses() {
        assert_eq!(check_domain(" Shop.Example.COM. ").unwrap(), "shop.example.com");
        for bad in [
            "",
            "*.example.com",
            "a..b",
            "-a.example",
            "a_b.example",
            "10.0.0.1",
            "a b",
        ] {
            assert!(check_domain(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
