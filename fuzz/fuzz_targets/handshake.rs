//! The handshake: greeting, client flags and option negotiation (with STARTTLS in every TLS
//! mode), then the transmission phase for a handshake that reaches it. Input: a TLS mode byte,
//! then the client's bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|input: &[u8]| nbdfault::fuzzing::handshake(input));
