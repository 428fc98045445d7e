//! How a command fails: with the one sentence `master-node` prints before
//! exiting with a failure status. Anything displayable converts into it.

/// A failure with the sentence to print.
pub struct Fail(pub String);

impl<E: std::fmt::Display> From<E> for Fail {
    fn from(e: E) -> Self {
        Fail(e.to_string())
    }
}
