//! The web demo at `/`: built into the binary (so it is served from any working directory), or,
//! with `web_demo_dir` set, read from that directory on each request (edit and reload while
//! developing a client).

use std::path::Path;

use axum::Router;
use axum::http::header;
use axum::routing::get;

const INDEX_HTML: &str = include_str!("../web-demo/index.html");
const APP_JS: &str = include_str!("../web-demo/app.js");
const SCHEMA_JS: &str = include_str!("../web-demo/schema.js");
const EVENTS_DTS: &str = include_str!("../web-demo/events.d.ts");

/// The demo's routes: the files of `dir` (`/` is its `index.html`), or the built-in demo when
/// `dir` is `None`.
pub fn routes(dir: Option<&Path>) -> Router {
    match dir {
        // One path segment: the demo is a flat directory, and the API's own routes (static
        // paths) keep precedence over the parameter.
        Some(dir) => {
            let files = tower_http::services::ServeDir::new(dir);
            Router::new().route_service("/", files.clone()).route_service("/{file}", files)
        }
        None => built_in(),
    }
}

fn built_in() -> Router {
    const HTML: &str = "text/html; charset=utf-8";
    const JS: &str = "text/javascript; charset=utf-8";
    Router::new()
        .route("/", get(|| async { ([(header::CONTENT_TYPE, HTML)], INDEX_HTML) }))
        .route("/index.html", get(|| async { ([(header::CONTENT_TYPE, HTML)], INDEX_HTML) }))
        .route("/app.js", get(|| async { ([(header::CONTENT_TYPE, JS)], APP_JS) }))
        .route("/schema.js", get(|| async { ([(header::CONTENT_TYPE, JS)], SCHEMA_JS) }))
        .route("/events.d.ts", get(|| async { ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], EVENTS_DTS) }))
}
