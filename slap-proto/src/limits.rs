//! Body limits both ends of SLAP apply: the gateway refuses an oversized
//! call before forwarding it, a replica before reading it. A replica's
//! limits are the cluster's (replicated, changed with `master-node limits
//! set`); these are their defaults, which the gateway uses unless told
//! otherwise.

/// Default bytes of one call's body, documents aside.
pub const BODY_BYTES: u32 = 2 << 20;

/// Default bytes of a document: a computer's format
/// (`loadComputerConfigurationFromXML`), a usage journal (`useComputer`),
/// and any native API call (whose format call carries a computer).
pub const DOCUMENT_BYTES: u32 = 16 << 20;

/// Whether a call's body is a document (bounded by the document limit).
pub fn carries_document(path: &str) -> bool {
    matches!(path, "/loadComputerConfigurationFromXML" | "/useComputer")
        || path.starts_with("/slapos.master.v1.Master/")
}

/// The longest a replica holds a poll of a computer's document
/// (`X-Slap-Wait`); gateways allow a held poll this much on top of their
/// per-attempt bound, so a held poll is never retried as a failure.
pub const POLL_HOLD_SECS: u64 = 25;

/// The header a long poll names its hold in, in seconds.
pub const POLL_HOLD_HEADER: &str = "x-slap-wait";

/// The header a gateway sends a poll to any replica with: the computer's
/// revision the leader's feed told it of. A replica that has not applied
/// that revision yet waits up to [`MIN_REVISION_WAIT_MS`], then answers 503
/// (the gateway asks the next replica): a follower never serves a document
/// older than what the gateway already knows.
pub const MIN_REVISION_HEADER: &str = "x-slap-min-revision";

/// How long a replica waits to catch up with [`MIN_REVISION_HEADER`].
pub const MIN_REVISION_WAIT_MS: u64 = 500;

/// The ETag of a computer's document at a revision (`"COMP-1-42"`): what
/// a replica sends and a gateway answers `If-None-Match` against.
pub fn document_etag(computer: &str, revision: u64) -> String {
    format!("\"{computer}-{revision}\"")
}

/// The revision a [`document_etag`] of `computer` names; `None` for an
/// ETag of another computer or another form.
pub fn parse_document_etag(etag: &str, computer: &str) -> Option<u64> {
    let inner = etag.trim().strip_prefix('"')?.strip_suffix('"')?;
    let (id, revision) = inner.rsplit_once('-')?;
    (id == computer).then_some(())?;
    revision.parse().ok()
}

/// How long a poll asks to be held: its `X-Slap-Wait` value, capped at
/// [`POLL_HOLD_SECS`]; zero when absent or not a number.
pub fn poll_hold(value: Option<&[u8]>) -> std::time::Duration {
    let secs = value
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    std::time::Duration::from_secs(secs.min(POLL_HOLD_SECS))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document_etags_name_their_computer_and_revision() {
        assert_eq!(document_etag("COMP-1", 42), "\"COMP-1-42\"");
        assert_eq!(parse_document_etag(&document_etag("COMP-1", 42), "COMP-1"), Some(42));
        assert_eq!(parse_document_etag(" \"COMP-1-42\" ", "COMP-1"), Some(42));
        assert_eq!(
            parse_document_etag("\"COMP-1-42\"", "COMP-2"),
            None,
            "another computer's"
        );
        assert_eq!(parse_document_etag("COMP-1-42", "COMP-1"), None, "unquoted");
        assert_eq!(parse_document_etag("\"COMP-1-x\"", "COMP-1"), None);
        assert_eq!(parse_document_etag("W/\"COMP-1-42\"", "COMP-1"), None);
    }

    #[test]
    fn a_poll_hold_is_read_in_seconds_and_capped() {
        use std::time::Duration;
        assert_eq!(poll_hold(None), Duration::ZERO);
        assert_eq!(poll_hold(Some(b" 8 ")), Duration::from_secs(8));
        assert_eq!(poll_hold(Some(b"3600")), Duration::from_secs(POLL_HOLD_SECS));
        assert_eq!(poll_hold(Some(b"soon")), Duration::ZERO);
    }

    #[test]
    fn documents_are_the_format_the_journal_and_native_calls() {
        assert!(super::carries_document("/loadComputerConfigurationFromXML"));
        assert!(super::carries_document("/slapos.master.v1.Master/Format"));
        assert!(!super::carries_document("/requestComputerPartition"));
    }

    // A document may always be as large as any other call.
    const _: () = assert!(super::BODY_BYTES < super::DOCUMENT_BYTES);
}
