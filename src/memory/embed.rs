//! An OpenAI-compatible embeddings client: `POST {base}/v1/embeddings` with
//! `{"model", "input": [texts]}`, answered by `{"data": [{"index", "embedding": [f32...]}]}`
//! (OpenAI API reference, "Embeddings"; Ollama, vLLM and LiteLLM serve the same shape).

use std::time::Duration;

use futures::StreamExt as _;
use serde::Deserialize;
use serde_json::json;

use crate::config::memory::MemoryEndpoint;

/// Largest response body accepted, bytes (a hostile server cannot make us buffer more).
const MAX_BODY: usize = 8 * 1024 * 1024;
/// Texts sent in one request at most.
pub const MAX_INPUTS: usize = 64;
/// Largest vector accepted (dimensions).
const MAX_DIMS: usize = 8192;

/// The embeddings server.
#[derive(Clone)]
pub struct Embedder {
    url: String,
    model: String,
    api_key: Option<String>,
    client: reqwest::Client,
    timeout: Duration,
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedder").field("url", &self.url).field("model", &self.model).finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct Answer {
    data: Vec<Item>,
}

#[derive(Deserialize)]
struct Item {
    #[serde(default)]
    index: Option<usize>,
    embedding: Vec<f32>,
}

/// `base/v1/path` whether or not `base` already ends in `/v1`.
pub fn v1_url(base: &str, path: &str) -> String {
    let base = base.trim_end_matches('/');
    if base.ends_with("/v1") { format!("{base}{path}") } else { format!("{base}/v1{path}") }
}

impl Embedder {
    /// A client for `endpoint` with a per-request deadline.
    pub fn new(endpoint: &MemoryEndpoint, client: reqwest::Client, timeout: Duration) -> Self {
        Self {
            url: v1_url(&endpoint.base_url, "/embeddings"),
            model: endpoint.model.clone(),
            api_key: endpoint.api_key.as_ref().map(|k| k.expose().to_owned()),
            client,
            timeout,
        }
    }

    /// One vector per text, in order (at most [`MAX_INPUTS`] texts). Errors say what failed,
    /// never the key.
    pub async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, String> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        if texts.len() > MAX_INPUTS {
            return Err(format!("{} texts in one request (at most {MAX_INPUTS})", texts.len()));
        }
        let mut rb = self.client.post(&self.url).json(&json!({"model": self.model, "input": texts}));
        if let Some(k) = &self.api_key {
            rb = rb.bearer_auth(k);
        }
        let work = async {
            let res = rb.send().await.map_err(|e| format!("{}: {}", self.url, kind_of(&e)))?;
            let status = res.status();
            if !status.is_success() {
                return Err(format!("{} answered {status}", self.url));
            }
            let mut body = Vec::new();
            let mut stream = res.bytes_stream();
            while let Some(chunk) = stream.next().await {
                body.extend_from_slice(&chunk.map_err(|e| format!("{}: {}", self.url, kind_of(&e)))?);
                if body.len() > MAX_BODY {
                    return Err(format!("{}: response larger than {MAX_BODY} bytes", self.url));
                }
            }
            Ok(body)
        };
        let body = tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| format!("{} did not answer within {:?}", self.url, self.timeout))??;
        let answer: Answer =
            serde_json::from_slice(&body).map_err(|e| format!("{}: not an embeddings answer: {e}", self.url))?;
        parse(answer, texts.len()).map_err(|e| format!("{}: {e}", self.url))
    }
}

/// The vectors of `answer` in input order: one per input, all of one non-zero dimension.
fn parse(answer: Answer, inputs: usize) -> Result<Vec<Vec<f32>>, String> {
    if answer.data.len() != inputs {
        return Err(format!("{} vectors for {inputs} inputs", answer.data.len()));
    }
    let mut out: Vec<Option<Vec<f32>>> = vec![None; inputs];
    for (i, item) in answer.data.into_iter().enumerate() {
        let at = item.index.unwrap_or(i);
        let slot = out.get_mut(at).ok_or_else(|| format!("index {at} out of range"))?;
        *slot = Some(item.embedding);
    }
    let out: Vec<Vec<f32>> = out.into_iter().collect::<Option<_>>().ok_or("an input got no vector")?;
    let dims = out[0].len();
    if dims == 0 || dims > MAX_DIMS || out.iter().any(|v| v.len() != dims) {
        return Err(format!("vectors must share one dimension in 1..={MAX_DIMS}"));
    }
    Ok(out)
}

/// reqwest errors print the URL; keep only the kind.
fn kind_of(e: &reqwest::Error) -> &'static str {
    if e.is_connect() {
        "connection failed"
    } else if e.is_timeout() {
        "timed out"
    } else {
        "request failed"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(json: &str) -> Answer {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn vectors_come_back_in_input_order_by_index() {
        let a = answer(r#"{"data":[{"index":1,"embedding":[0,1]},{"index":0,"embedding":[1,0]}],"model":"m"}"#);
        assert_eq!(parse(a, 2).unwrap(), vec![vec![1.0, 0.0], vec![0.0, 1.0]]);
    }

    #[test]
    fn wrong_counts_dimensions_and_indexes_are_errors() {
        assert!(parse(answer(r#"{"data":[{"embedding":[1]}]}"#), 2).is_err());
        assert!(parse(answer(r#"{"data":[{"embedding":[1]},{"embedding":[1,2]}]}"#), 2).is_err());
        assert!(parse(answer(r#"{"data":[{"index":5,"embedding":[1]}]}"#), 1).is_err());
        assert!(parse(answer(r#"{"data":[{"embedding":[]}]}"#), 1).is_err());
    }

    #[test]
    fn v1_is_added_once() {
        assert_eq!(v1_url("http://h:1/", "/embeddings"), "http://h:1/v1/embeddings");
        assert_eq!(v1_url("https://api.example.com/v1", "/embeddings"), "https://api.example.com/v1/embeddings");
    }
}
