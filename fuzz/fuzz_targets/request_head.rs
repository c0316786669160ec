#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sessiongate::fuzzing::request_head(data));
