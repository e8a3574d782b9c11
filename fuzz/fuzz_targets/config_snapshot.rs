//! `config_snapshot`: see `bulwark_agent::fuzzing::config_snapshot`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| bulwark_agent::fuzzing::config_snapshot(data));
