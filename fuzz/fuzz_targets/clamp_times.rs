//! A layer tar from anywhere, its times clamped as an image built with
//! SOURCE_DATE_EPOCH stores it: no panic, and what comes out clamps to
//! itself unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut once = Vec::new();
    if strata_snapshot::clamp_times(data, &mut once, 1_000_000_000).is_ok() {
        let mut twice = Vec::new();
        let changed = strata_snapshot::clamp_times(once.as_slice(), &mut twice, 1_000_000_000)
            .expect("a clamped layer is a layer");
        assert_eq!(changed, 0);
        assert_eq!(once, twice);
    }
});
