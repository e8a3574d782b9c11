//! `protocol_detect`: see `bulwark_agent::fuzzing::protocol_detect`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| bulwark_agent::fuzzing::protocol_detect(data));
