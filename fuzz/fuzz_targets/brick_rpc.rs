//! Every brick RPC, as programs of requests from fuzz input (see `mortar_fuzz::brick`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(init: mortar_fuzz::brick::init(), |data: &[u8]| {
    mortar_fuzz::brick::run(data);
});
