//! Without a `garage` binary the S3 tests fail, saying how to install it;
//! they never pass by skipping. Its own test binary: it sets `GARAGE_BIN`.

use lazystore_testkit::garage::Garage;

#[test]
#[should_panic(expected = "cargo install garage --no-default-features")]
fn a_missing_garage_fails_saying_how_to_install_it() {
    // SAFETY: the only test of this binary; nothing else reads the
    // environment meanwhile.
    unsafe { std::env::set_var("GARAGE_BIN", "/nonexistent/garage") };
    Garage::start();
}
