//! The issuer's answer bodies (contract §4): a `200` body as a raw JWT or `{"token": ...}`,
//! the unverified `jti` read from the JWT payload, and a `4xx` body cut into an error. Never
//! a panic; a token is bounded visible ASCII, its `jti` storable as Postgres text, and the
//! error text bounded and free of the master token.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tenant_tokens::issuer::read_answer_body;

/// A master token an issuer could echo; it contains no `*`, so masking cannot make a new one.
const MASTER: &str = "fuzz-master-token";

fuzz_target!(|body: &[u8]| {
    let (token, error) = read_answer_body(body, MASTER);
    assert!(error.len() <= 1024, "error text of {} bytes", error.len());
    assert!(
        !error.contains(MASTER),
        "the master token reached the error"
    );
    let Some(token) = token else { return };
    let text = token.expose();
    assert!(
        !text.is_empty() && text.len() <= 16 * 1024,
        "token of {} bytes",
        text.len()
    );
    assert!(
        text.bytes().all(|b| b.is_ascii_graphic()),
        "token with white space or controls"
    );
    let fingerprint = token.fingerprint();
    assert_eq!(fingerprint.as_str().len(), 16);
    if let Some(jti) = token.jti() {
        assert!(
            !jti.is_empty() && jti.len() <= 256,
            "jti of {} bytes",
            jti.len()
        );
        assert!(
            !jti.chars().any(char::is_control),
            "control character in the jti"
        );
    }
});
