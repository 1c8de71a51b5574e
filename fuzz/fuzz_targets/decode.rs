//! The message decoder (contract §3) on any envelope and body: it never panics, what it
//! accepts is storable and publishable, what it refuses is named without echoing the body.
//! Input: five header lines (routing key, content type, message id, correlation id,
//! traceparent), then the body; see `DecodeInput`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tenant_tokens::pipeline::decode::decode;
use tenant_tokens_fuzz::{DecodeInput, check_accepted, check_refused};

fuzz_target!(|data: &[u8]| {
    let input = DecodeInput::split(data);
    let env = input.envelope();
    match decode(&env, input.body) {
        Ok(request) => check_accepted(&env, &request),
        Err(e) => check_refused(input.body, &e, |other| {
            decode(&env, other).err().map(|e| e.to_string())
        }),
    }
});
