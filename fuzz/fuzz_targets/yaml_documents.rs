//! `yaml_documents`: see `bulwark_control_plane::fuzzing::yaml_documents`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| bulwark_control_plane::fuzzing::yaml_documents(data));
