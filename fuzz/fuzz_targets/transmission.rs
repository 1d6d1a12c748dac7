//! The request decoder and the request path: header decoding, validation against the negotiated
//! flags, payloads and drains, the fault layer and memory storage. Input: a byte choosing the
//! export (plain, faulty, read-only) and the reply style, then the client's request stream.
#![no_main]

libfuzzer_sys::fuzz_target!(|input: &[u8]| nbdfault::fuzzing::transmission(input));
