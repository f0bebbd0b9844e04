//! The volfile parser: any text either parses into a valid volfile or is an error, and a
//! volfile that parses survives its own serialisation unchanged (the brick serves the text
//! it parsed; the operator and `mortar local` write volfiles with `to_yaml`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mortar_common::volfile::Volfile;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(v) = Volfile::parse(text) else {
        return;
    };
    let yaml = v.to_yaml();
    match Volfile::parse(&yaml) {
        Ok(again) => assert_eq!(again, v, "round trip changed the volfile:\n{yaml}"),
        Err(e) => panic!("to_yaml wrote a volfile that does not parse ({e}):\n{yaml}"),
    }
    // The derived answers must not panic either.
    let _ = (v.quorum(), v.ping_timeout(), v.brick_index("b0"));
    for b in &v.bricks {
        let _ = mortar_common::volfile::with_default_port(&b.address);
    }
});
