//! The web demo's generated event types (`web-demo/events.d.ts`, `web-demo/schema.js`) must match
//! the Rust schema: this fails when they are stale. `KOTODAMA_BLESS=1` rewrites them.

use std::path::PathBuf;

fn check(file: &str, fresh: String) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../web-demo").join(file);
    if std::env::var_os("KOTODAMA_BLESS").is_some() {
        std::fs::write(&path, &fresh).unwrap();
        return;
    }
    let current = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        current == fresh,
        "{} is stale: the event schema changed. Run `KOTODAMA_BLESS=1 cargo test -p signaling --test codegen` \
         and commit the result.",
        path.display()
    );
}

#[test]
fn typescript_types_match_the_schema() {
    let ts = signaling::codegen::typescript();
    for needle in [
        "export interface SessionReadyEvent",
        "export interface AgentInterruptedEvent",
        "export type ServerEvent =",
        "export type ClientEvent =",
        "export type Viseme =",
    ] {
        assert!(ts.contains(needle), "generated TypeScript has `{needle}`:\n{ts}");
    }
    check("events.d.ts", ts);
}

#[test]
fn javascript_constants_match_the_schema() {
    let js = signaling::codegen::javascript();
    assert!(js.contains("export const VISEMES = [\"sil\",\"PP\""), "{js}");
    check("schema.js", js);
}
