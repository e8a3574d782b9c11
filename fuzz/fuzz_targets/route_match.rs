//! `route_match`: see `bulwark_agent::fuzzing::route_match`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| bulwark_agent::fuzzing::route_match(data));
