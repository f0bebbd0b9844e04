//! FUSE requests as the kernel sends them, through fuser's session loop into the mount's
//! filesystem and a real brick (see `mortar_fuzz::fuse`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(init: mortar_fuzz::fuse::init(), |data: &[u8]| {
    mortar_fuzz::fuse::run(data);
});
