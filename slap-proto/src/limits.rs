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

#[cfg(test)]
mod tests {
    #[test]
    fn documents_are_the_format_the_journal_and_native_calls() {
        assert!(super::carries_document("/loadComputerConfigurationFromXML"));
        assert!(super::carries_document("/slapos.master.v1.Master/Format"));
        assert!(!super::carries_document("/requestComputerPartition"));
    }

    // A document may always be as large as any other call.
    const _: () = assert!(super::BODY_BYTES < super::DOCUMENT_BYTES);
}
