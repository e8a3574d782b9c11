//! `shard_key`: see `bulwark_agent::fuzzing::shard_key`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| bulwark_agent::fuzzing::shard_key(data));
