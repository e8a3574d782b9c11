//! `http1_head`: see `bulwark_agent::fuzzing::http1_head`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| bulwark_agent::fuzzing::http1_head(data));
