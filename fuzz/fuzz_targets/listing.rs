//! Fuzzes the NAR listing (`.ls`) parser: any bytes must parse or be
//! refused without a panic, and whatever parses (with UTF-8 names, as JSON
//! requires) must survive writing and parsing again unchanged.

#![no_main]

use lazystore_pathinfo::listing::Listing;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(listing) = Listing::parse(data) else {
        return;
    };
    assert!(listing.is_utf8(), "a parsed listing has a non-UTF-8 name");
    let json = listing.to_json();
    let again = Listing::parse(&json).unwrap_or_else(|e| {
        panic!(
            "written listing does not parse: {e:?}\n{}",
            String::from_utf8_lossy(&json)
        )
    });
    assert_eq!(again, listing, "listing changed through write and parse");
});
