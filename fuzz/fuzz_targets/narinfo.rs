//! Fuzzes the narinfo parser: any text must parse or be refused without a
//! panic, and whatever parses must survive rendering and parsing again
//! unchanged.

#![no_main]

use lazystore_pathinfo::NarInfo;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // A narinfo is text; bytes that are not UTF-8 never reach the parser.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(info) = NarInfo::parse(text) else {
        return;
    };
    let rendered = info.to_string();
    let again = NarInfo::parse(&rendered)
        .unwrap_or_else(|e| panic!("rendered narinfo does not parse: {e}\n{rendered}"));
    assert_eq!(
        again, info,
        "narinfo changed through render and parse:\n{rendered}"
    );
});
