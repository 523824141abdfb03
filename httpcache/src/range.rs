//! The `Range` request header (RFC 9110 §14), for a single byte range.
//!
//! One range is served as `206 Partial Content`. A header this server does
//! not act on — several ranges, another unit, bad syntax — is ignored and
//! the whole NAR is sent, as the RFC allows; a well-formed range that lies
//! wholly past the end is `416`.

use std::ops::Range;

/// What a `Range` header asks of a body of `size` bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum Ranged {
    /// Send everything (no header, or one not acted on).
    Whole,
    /// Send these bytes (non-empty, within the body).
    Part(Range<u64>),
    /// The range is past the end: `416`.
    Unsatisfiable,
}

/// Interprets `header` (the `Range` value, if any) for a body of `size`
/// bytes.
pub fn parse(header: Option<&str>, size: u64) -> Ranged {
    let Some(header) = header else {
        return Ranged::Whole;
    };
    let Some(spec) = header.trim().strip_prefix("bytes=") else {
        return Ranged::Whole;
    };
    let spec = spec.trim();
    if spec.contains(',') {
        return Ranged::Whole;
    }
    let Some((first, last)) = spec.split_once('-') else {
        return Ranged::Whole;
    };
    let (first, last) = (first.trim(), last.trim());
    if first.is_empty() {
        // bytes=-N: the last N bytes.
        return match number(last) {
            None => Ranged::Whole,
            Some(0) => Ranged::Unsatisfiable,
            Some(_) if size == 0 => Ranged::Unsatisfiable,
            Some(suffix) => Ranged::Part(size.saturating_sub(suffix)..size),
        };
    }
    // bytes=A- and bytes=A-B.
    let Some(start) = number(first) else {
        return Ranged::Whole;
    };
    let last = match last {
        "" => None,
        text => match number(text) {
            Some(last) if last >= start => Some(last),
            _ => return Ranged::Whole,
        },
    };
    if start >= size {
        return Ranged::Unsatisfiable;
    }
    Ranged::Part(start..last.map_or(size, |l| l.saturating_add(1).min(size)))
}

/// A decimal number; one too large for u64 is u64::MAX, which the callers
/// clamp to the end of the body.
fn number(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(s.parse().unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        let p = |h: &str| parse(Some(h), 1000);
        assert_eq!(parse(None, 1000), Ranged::Whole);
        assert_eq!(p("bytes=0-0"), Ranged::Part(0..1));
        assert_eq!(p("bytes=0-999"), Ranged::Part(0..1000));
        assert_eq!(p("bytes=0-5000"), Ranged::Part(0..1000));
        assert_eq!(p("bytes=10-"), Ranged::Part(10..1000));
        assert_eq!(p("bytes=999-"), Ranged::Part(999..1000));
        assert_eq!(p("bytes=-1"), Ranged::Part(999..1000));
        assert_eq!(p("bytes=-5000"), Ranged::Part(0..1000));
        assert_eq!(p("bytes= 5 - 9 "), Ranged::Part(5..10));
        assert_eq!(p("bytes=0-99999999999999999999999"), Ranged::Part(0..1000));
        assert_eq!(p("bytes=1000-"), Ranged::Unsatisfiable);
        assert_eq!(p("bytes=1000-2000"), Ranged::Unsatisfiable);
        assert_eq!(p("bytes=-0"), Ranged::Unsatisfiable);
        assert_eq!(parse(Some("bytes=-5"), 0), Ranged::Unsatisfiable);
        // Not acted on: the whole body.
        for h in [
            "bytes=5-1",
            "bytes=0-1,5-6",
            "items=0-1",
            "bytes=a-b",
            "bytes=-",
            "bytes=1",
            "bytes=+1-2",
            "",
        ] {
            assert_eq!(p(h), Ranged::Whole, "{h:?}");
        }
    }
}
