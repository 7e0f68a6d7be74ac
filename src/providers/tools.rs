//! Tools a character's model may call: name, JSON schema, async handler, timeout.
//!
//! The registry is provider-agnostic: a provider declares [`ToolRegistry::specs`] to its model
//! and runs calls through [`ToolRegistry::call`], which never fails and never hangs: an unknown
//! tool, a handler error, bad arguments or a timeout all become an error *output* that goes back to
//! the model, so the turn always continues. Side effects the session must see (an emotion) come
//! back as [`ToolEffect`]s for the provider to turn into events.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::{Value, json};
use signaling::events::Emotion;

/// A tool as declared to the model.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSpec {
    /// Function name.
    pub name: String,
    /// What it does (the model reads this).
    pub description: String,
    /// JSON schema of the arguments.
    pub parameters: Value,
}

impl ToolSpec {
    /// The api-v1 form (`session.update.tools` of a client, recordings).
    pub fn declaration(&self) -> signaling::events::ToolDeclaration {
        signaling::events::ToolDeclaration {
            name: self.name.clone(),
            description: self.description.clone(),
            parameters: self.parameters.clone(),
        }
    }
}

impl From<signaling::events::ToolDeclaration> for ToolSpec {
    /// A client's declaration; absent `parameters` become an empty object schema.
    fn from(d: signaling::events::ToolDeclaration) -> Self {
        let parameters =
            if d.parameters.is_null() { json!({"type": "object", "properties": {}}) } else { d.parameters };
        Self { name: d.name, description: d.description, parameters }
    }
}

/// Default time a handler may take.
pub const DEFAULT_TOOL_TIMEOUT: Duration = Duration::from_secs(5);

/// What the session must do besides answering the model.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ToolEffect {
    /// Show this emotion.
    Emotion(String),
}

/// A handler's successful result.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolOutput {
    /// What goes back to the model (JSON).
    pub output: Value,
    /// Side effects for the session.
    pub effects: Vec<ToolEffect>,
}

/// An async tool handler: arguments in, output or an error message out.
pub type ToolHandler = Arc<dyn Fn(Value) -> BoxFuture<'static, Result<ToolOutput, String>> + Send + Sync>;

/// One tool.
#[derive(Clone)]
pub struct Tool {
    /// Declared name, description and JSON schema.
    pub spec: ToolSpec,
    /// The code that runs it.
    pub handler: ToolHandler,
    /// How long it may take.
    pub timeout: Duration,
}

impl std::fmt::Debug for Tool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tool").field("name", &self.spec.name).field("timeout", &self.timeout).finish()
    }
}

/// The result of one call, always an answer for the model.
#[derive(Debug, Clone, PartialEq)]
pub struct CallResult {
    /// JSON text for `function_call_output`.
    pub output: String,
    /// Side effects (empty on error).
    pub effects: Vec<ToolEffect>,
    /// Whether it failed (unknown tool, bad arguments, handler error, timeout).
    pub failed: bool,
}

/// The tools of one character.
#[derive(Debug, Clone, Default)]
pub struct ToolRegistry {
    tools: BTreeMap<String, Tool>,
    /// The session's tool-call budget ([`crate::session::budget`]): every call is counted, and
    /// refused past the cap.
    budget: Option<Arc<crate::session::budget::ToolCallCounter>>,
}

impl ToolRegistry {
    /// No tools.
    pub fn empty() -> Self {
        Self::default()
    }

    /// The built-in tools: `set_emotion` and `get_time`.
    pub fn builtin() -> Self {
        let mut r = Self::empty();
        r.register(Tool {
            spec: ToolSpec {
                name: "set_emotion".into(),
                description: "Show an emotion on the character's face while speaking.".into(),
                parameters: json!({
                    "type": "object",
                    "properties": {"emotion": {"type": "string", "enum": Emotion::known_names()}},
                    "required": ["emotion"],
                }),
            },
            handler: Arc::new(|args: Value| {
                Box::pin(async move {
                    let e = args.get("emotion").and_then(Value::as_str).ok_or("`emotion` is required")?;
                    if !Emotion::is_known(e) {
                        let known = Emotion::known_names().join(", ");
                        return Err(format!("unknown emotion `{e}`; use one of {known}"));
                    }
                    Ok(ToolOutput { output: json!({"ok": true}), effects: vec![ToolEffect::Emotion(e.to_owned())] })
                })
            }),
            timeout: DEFAULT_TOOL_TIMEOUT,
        });
        r.register(Tool {
            spec: ToolSpec {
                name: "get_time".into(),
                description: "The current date and time (UTC, RFC 3339).".into(),
                parameters: json!({"type": "object", "properties": {}}),
            },
            handler: Arc::new(|_args: Value| {
                Box::pin(async move {
                    let now = time::OffsetDateTime::now_utc();
                    let text = now.format(&time::format_description::well_known::Rfc3339).map_err(|e| e.to_string())?;
                    Ok(ToolOutput { output: json!({"utc": text}), effects: vec![] })
                })
            }),
            timeout: DEFAULT_TOOL_TIMEOUT,
        });
        r
    }

    /// Add or replace a tool.
    pub fn register(&mut self, tool: Tool) {
        self.tools.insert(tool.spec.name.clone(), tool);
    }

    /// Whether a tool of this name is registered.
    pub fn contains(&self, name: &str) -> bool {
        self.tools.contains_key(name)
    }

    /// The registered names, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.tools.keys().map(String::as_str).collect()
    }

    /// Only the named tools (a character's selection); unknown names are skipped.
    pub fn only<S: AsRef<str>>(&self, names: &[S]) -> Self {
        let tools =
            names.iter().filter_map(|n| self.tools.get(n.as_ref())).map(|t| (t.spec.name.clone(), t.clone())).collect();
        Self { tools, budget: self.budget.clone() }
    }

    /// These tools, with every call counted against `budget` (one session's registry).
    pub fn with_budget(mut self, budget: Arc<crate::session::budget::ToolCallCounter>) -> Self {
        self.budget = Some(budget);
        self
    }

    /// Declarations for the model.
    pub fn specs(&self) -> Vec<ToolSpec> {
        self.tools.values().map(|t| t.spec.clone()).collect()
    }

    /// Whether there are no tools.
    pub fn is_empty(&self) -> bool {
        self.tools.is_empty()
    }

    /// Run `name(arguments)`; every failure is an error output for the model.
    pub async fn call(&self, name: &str, arguments: &str) -> CallResult {
        let fail =
            |msg: String| CallResult { output: json!({"error": msg}).to_string(), effects: vec![], failed: true };
        let Some(tool) = self.tools.get(name) else {
            return fail(format!("unknown tool `{name}`"));
        };
        if self.budget.as_ref().is_some_and(|b| !b.try_call()) {
            return fail("the tool-call budget of this session is used up; answer without tools".into());
        }
        let args: Value = if arguments.trim().is_empty() {
            json!({})
        } else {
            match serde_json::from_str(arguments) {
                Ok(v) => v,
                Err(e) => return fail(format!("arguments are not JSON: {e}")),
            }
        };
        match tokio::time::timeout(tool.timeout, (tool.handler)(args)).await {
            Ok(Ok(out)) => CallResult { output: out.output.to_string(), effects: out.effects, failed: false },
            Ok(Err(msg)) => fail(msg),
            Err(_) => fail(format!("`{name}` timed out after {} ms", tool.timeout.as_millis())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn set_emotion_returns_the_effect_and_rejects_unknown_emotions() {
        let r = ToolRegistry::builtin();
        let ok = r.call("set_emotion", r#"{"emotion":"happy"}"#).await;
        assert!(!ok.failed);
        assert_eq!(ok.effects, vec![ToolEffect::Emotion("happy".into())]);
        let bad = r.call("set_emotion", r#"{"emotion":"smug"}"#).await;
        assert!(bad.failed && bad.output.contains("unknown emotion"), "{bad:?}");
        assert!(bad.effects.is_empty());
    }

    #[test]
    fn a_character_selects_its_tools() {
        let r = ToolRegistry::builtin();
        assert_eq!(r.names(), ["get_time", "set_emotion"]);
        let only = r.only(&["set_emotion", "unknown"]);
        assert_eq!(only.names(), ["set_emotion"]);
        assert!(r.only::<&str>(&[]).is_empty());
    }

    #[tokio::test]
    async fn get_time_answers_rfc3339() {
        let r = ToolRegistry::builtin();
        let out = r.call("get_time", "").await;
        let v: Value = serde_json::from_str(&out.output).unwrap();
        let t = v["utc"].as_str().unwrap();
        assert!(t.len() >= 20 && t.as_bytes()[10] == b'T' && t.ends_with('Z'), "{t}");
    }

    #[tokio::test]
    async fn unknown_tool_bad_json_and_handler_errors_become_outputs() {
        let mut r = ToolRegistry::builtin();
        let u = r.call("launch_rockets", "{}").await;
        assert!(u.failed && u.output.contains("unknown tool `launch_rockets`"));
        let j = r.call("set_emotion", "{not json").await;
        assert!(j.failed && j.output.contains("not JSON"));
        r.register(Tool {
            spec: ToolSpec { name: "broken".into(), description: String::new(), parameters: json!({}) },
            handler: Arc::new(|_| Box::pin(async { Err("database down".to_string()) })),
            timeout: DEFAULT_TOOL_TIMEOUT,
        });
        let b = r.call("broken", "{}").await;
        assert!(b.failed && b.output.contains("database down"));
    }

    #[tokio::test]
    async fn calls_past_the_sessions_budget_are_refused_to_the_model() {
        use crate::session::budget::{Cap, Scope, ToolCallCounter};
        let cap = Cap { max: 1, scope: Scope::Session, limit: 1, before: 0 };
        let counter = Arc::new(ToolCallCounter::new(Some(cap)));
        let r = ToolRegistry::builtin().with_budget(Arc::clone(&counter)).only(&["get_time"]);
        assert!(!r.call("get_time", "").await.failed);
        let refused = r.call("get_time", "").await;
        assert!(refused.failed && refused.output.contains("budget"), "{refused:?}");
        assert_eq!((counter.calls(), counter.refused()), (1, 1));
    }

    #[tokio::test]
    async fn a_hanging_handler_times_out_into_an_error_output() {
        let mut r = ToolRegistry::empty();
        r.register(Tool {
            spec: ToolSpec { name: "hang".into(), description: String::new(), parameters: json!({}) },
            handler: Arc::new(|_| Box::pin(std::future::pending())),
            timeout: Duration::from_millis(50),
        });
        let out = r.call("hang", "{}").await;
        assert!(out.failed && out.output.contains("timed out after 50 ms"), "{out:?}");
    }
}
