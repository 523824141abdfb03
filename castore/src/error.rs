//! What every crate's errors share: [`error_chain`], the one formatter of
//! an error with its causes for log lines and messages.

use std::error::Error;

/// An error's message followed by each of its causes', `a: b: c`. Causes
/// whose message the one above already ends with (a wrapper written as
/// `"{context}: {source}"` that also keeps `source`) are not repeated.
pub fn error_chain(error: &dyn Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let message = cause.to_string();
        if !out.ends_with(&message) {
            out.push_str(": ");
            out.push_str(&message);
        }
        source = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("{0}")]
    struct Leaf(&'static str);

    #[derive(Debug, thiserror::Error)]
    #[error("{what}")]
    struct Wrap {
        what: String,
        #[source]
        source: Leaf,
    }

    #[test]
    fn chains_causes_once() {
        let plain = Wrap {
            what: "cannot open store x".into(),
            source: Leaf("no such file"),
        };
        assert_eq!(error_chain(&plain), "cannot open store x: no such file");
        let repeated = Wrap {
            what: "reading x: no such file".into(),
            source: Leaf("no such file"),
        };
        assert_eq!(error_chain(&repeated), "reading x: no such file");
    }
}
