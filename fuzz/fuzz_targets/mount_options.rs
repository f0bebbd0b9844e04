//! `mortar-mount`'s command line: the device spec and `-o` options (what mount(8) and fstab
//! pass) either give a consistent configuration or an error, never a panic.
//!
//! Input: text; its first line is the spec (`HOST[:PORT]:/VOLUME`), each further line one
//! `-o` argument; a final newline asks for `-f` (foreground).
#![no_main]

use std::path::Path;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use mortar_client::mount::{MountArgs, parse_spec};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let foreground = text.ends_with('\n');
    let mut lines = text.lines();
    let spec = lines.next().unwrap_or("");
    let opts: Vec<String> = lines.map(String::from).collect();
    let spec_ok = parse_spec(spec);
    match MountArgs::parse(spec, Path::new("/mnt"), &opts, foreground) {
        Ok(a) => {
            let (host, vol) = spec_ok.expect("options parsed with a bad spec");
            assert_eq!(a.servers[0], host);
            assert_eq!(a.volume, vol);
            assert!(!vol.contains('/') && !vol.is_empty() && !host.is_empty());
            assert!(a.servers.iter().all(|s| !s.is_empty()));
            let max = Duration::from_secs(3600);
            if let Some(t) = a.ping_timeout {
                assert!(!t.is_zero() && t <= max, "ping timeout {t:?}");
            }
            assert!(a.timeouts.attr <= max && a.timeouts.entry <= max);
            assert_eq!(a.foreground, foreground);
        }
        Err(e) => assert!(!e.is_empty()),
    }
});
