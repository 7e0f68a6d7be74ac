//! The node's addresses (top-level keys): `bind`, `public_ip`, `advertise_url`, `node_id`,
//! `web_demo_dir`.

use super::{Config, ConfigError, HTTP_SCHEMES, env, err, require_scheme};

/// `KOTODAMA_BIND`, `KOTODAMA_PUBLIC_IP`, `KOTODAMA_ADVERTISE_URL`, `KOTODAMA_NODE_ID`,
/// `KOTODAMA_WEB_DEMO_DIR`.
pub fn apply_env(c: &mut Config, get: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
    if let Some(bind) = env::parse(get, "KOTODAMA_BIND", "host:port", "use e.g. 127.0.0.1:8080 or 0.0.0.0:8080")? {
        c.bind = bind;
    }
    let fix = "use the address clients reach, e.g. 203.0.113.7";
    if let Some(ip) = env::parse(get, "KOTODAMA_PUBLIC_IP", "an IP address", fix)? {
        c.public_ip = Some(ip);
    }
    if let Some(v) = env::value(get, "KOTODAMA_ADVERTISE_URL") {
        c.advertise_url = Some(v.trim_end_matches('/').to_owned());
    }
    if let Some(v) = env::value(get, "KOTODAMA_NODE_ID") {
        c.node_id = Some(v);
    }
    if let Some(v) = env::value(get, "KOTODAMA_WEB_DEMO_DIR") {
        c.web_demo_dir = Some(v.into());
    }
    Ok(())
}

/// The advertised URL is http(s); the node id is short; the demo directory exists.
pub fn validate(c: &Config) -> Result<(), ConfigError> {
    if let Some(url) = &c.advertise_url {
        require_scheme(url, HTTP_SCHEMES, || {
            let fix = "use the URL clients reach this node at, e.g. https://node-1.example.com";
            err("KOTODAMA_ADVERTISE_URL", format!("`{url}` is not an http(s) URL"), fix)
        })?;
    }
    if c.node_id.as_ref().is_some_and(|n| n.is_empty() || n.len() > 200) {
        return Err(err("KOTODAMA_NODE_ID", "empty or longer than 200 characters", "use a short stable name"));
    }
    if let Some(dir) = &c.web_demo_dir
        && !dir.join("index.html").is_file()
    {
        return Err(err(
            "web_demo_dir",
            format!("{} has no index.html", dir.display()),
            "point it at a directory holding the demo (index.html, app.js, ...) or unset it for the built-in demo",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::tests::env;
    use super::*;

    #[test]
    fn bad_bind_names_the_variable() {
        assert_eq!(
            Config::default().apply_env(env(&[("KOTODAMA_BIND", "localhost")])).unwrap_err().key,
            "KOTODAMA_BIND"
        );
    }

    #[test]
    fn a_web_demo_dir_without_index_is_refused() {
        let c = Config::from_toml("web_demo_dir = \"/nonexistent/demo\"\n").unwrap();
        assert_eq!(c.validate().unwrap_err().key, "web_demo_dir");
    }
}
