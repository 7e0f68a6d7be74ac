//! The web demo at `/`: built in by default, served from `web_demo_dir` when that is set.

mod common;

use common::{TestServer, temp_dir};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_built_in_demo_is_served_when_no_directory_is_set() {
    let ts = TestServer::start().await;
    let res = ts.http.get(format!("{}/", ts.base)).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "text/html; charset=utf-8");
    let page = res.text().await.unwrap();
    assert_eq!(page, include_str!("../web-demo/index.html"), "the page built into the binary");
    let js = ts.http.get(format!("{}/app.js", ts.base)).send().await.unwrap();
    assert_eq!(js.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_directory_serves_its_own_files_and_the_api_still_answers() {
    let dir = temp_dir("web-demo");
    std::fs::write(dir.join("index.html"), "<!doctype html><title>my client</title>").unwrap();
    std::fs::write(dir.join("app.js"), "console.log('mine');").unwrap();
    let d = dir.clone();
    let ts = TestServer::start_with(move |c| c.web_demo_dir = Some(d)).await;

    let page = ts.http.get(format!("{}/", ts.base)).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    assert_eq!(page.text().await.unwrap(), "<!doctype html><title>my client</title>");
    let js = ts.http.get(format!("{}/app.js", ts.base)).send().await.unwrap();
    assert_eq!(js.text().await.unwrap(), "console.log('mine');", "the directory's app.js, not the built-in one");
    let missing = ts.http.get(format!("{}/schema.js", ts.base)).send().await.unwrap();
    assert_eq!(missing.status(), 404, "only what the directory holds");
    // Edits show without a restart: the directory is read per request.
    std::fs::write(dir.join("app.js"), "console.log('edited');").unwrap();
    let js = ts.http.get(format!("{}/app.js", ts.base)).send().await.unwrap();
    assert_eq!(js.text().await.unwrap(), "console.log('edited');");

    let health = ts.http.get(format!("{}/healthz", ts.base)).send().await.unwrap();
    assert_eq!(health.status(), 200, "API routes keep precedence over the demo's files");
    let chars = ts.http.get(format!("{}/v1/characters", ts.base)).send().await.unwrap();
    assert_eq!(chars.status(), 200);
}
