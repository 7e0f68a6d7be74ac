//! TypeScript types and JavaScript constants for clients, generated from the event schema.
//!
//! The web demo (and any TypeScript client) uses `web-demo/events.d.ts` and `web-demo/schema.js`,
//! which are produced here from the JSON Schema of [`ServerEvent`] and [`ClientEvent`] (derived by
//! `schemars` from the same serde definitions the server uses). A test compares the checked-in
//! files with a fresh generation, so CI fails when they are stale; set `KOTODAMA_BLESS=1` to
//! rewrite them.

use serde_json::{Map, Value};

use crate::events::{AgentState, ClientEvent, Emotion, PROTOCOL_VERSION, Role, ServerEvent, Viseme};

const HEADER: &str = "// Generated from signaling::events (the Rust schema) by signaling::codegen. Do not edit:\n\
                      // run `KOTODAMA_BLESS=1 cargo test -p signaling --test codegen` after changing the schema.\n";

/// `events.d.ts`: one interface per event, the unions, and the enums.
pub fn typescript() -> String {
    let server = serde_json::to_value(schemars::schema_for!(ServerEvent)).unwrap_or_default();
    let client = serde_json::to_value(schemars::schema_for!(ClientEvent)).unwrap_or_default();
    let mut out = String::from(HEADER);
    out.push('\n');
    let mut defs: Vec<(String, Value)> = Vec::new();
    for schema in [&server, &client] {
        if let Some(Value::Object(d)) = schema.get("$defs") {
            for (k, v) in d {
                if !defs.iter().any(|(n, _)| n == k) {
                    defs.push((k.clone(), v.clone()));
                }
            }
        }
    }
    defs.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, def) in &defs {
        doc(&mut out, def, "");
        out.push_str(&format!("export type {name} = {};\n\n", ts_type(def)));
    }
    union(&mut out, "ServerEvent", "", &server);
    union(&mut out, "ClientEvent", "Client", &client);
    out
}

/// `schema.js`: the runtime constants a client needs (an ES module).
pub fn javascript() -> String {
    let list = |v: Vec<String>| serde_json::to_string(&v).unwrap_or_default();
    let mut out = String::from(HEADER);
    out.push_str(&format!("export const PROTOCOL_VERSION = {PROTOCOL_VERSION};\n"));
    out.push_str(&format!(
        "export const SERVER_EVENT_TYPES = {};\n",
        list(ServerEvent::TYPES.iter().map(|s| s.to_string()).collect())
    ));
    out.push_str(&format!(
        "export const CLIENT_EVENT_TYPES = {};\n",
        list(ClientEvent::TYPES.iter().map(|s| s.to_string()).collect())
    ));
    out.push_str(&format!(
        "export const AGENT_STATES = {};\n",
        list(
            [AgentState::Initializing, AgentState::Listening, AgentState::Thinking, AgentState::Speaking]
                .iter()
                .map(wire)
                .collect()
        )
    ));
    out.push_str(&format!("export const ROLES = {};\n", list([Role::User, Role::Agent].iter().map(wire).collect())));
    out.push_str(&format!(
        "export const EMOTIONS = {};\n",
        list(Emotion::KNOWN.iter().map(|e| e.as_str().to_owned()).collect())
    ));
    out.push_str(&format!(
        "export const VISEMES = {};\n",
        list(Viseme::ALL.iter().map(|v| v.as_str().to_owned()).collect())
    ));
    out
}

/// The serde name of a unit enum value.
fn wire<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
}

fn doc(out: &mut String, v: &Value, indent: &str) {
    if let Some(d) = v.get("description").and_then(Value::as_str) {
        let first = d.split("\n\n").next().unwrap_or(d).replace('\n', " ").replace("*/", "* /");
        out.push_str(&format!("{indent}/** {first} */\n"));
    }
}

fn pascal(wire: &str) -> String {
    wire.split(['.', '_'])
        .filter(|p| !p.is_empty())
        .map(|p| {
            let mut c = p.chars();
            c.next().map(|f| f.to_uppercase().collect::<String>() + c.as_str()).unwrap_or_default()
        })
        .collect()
}

fn union(out: &mut String, name: &str, prefix: &str, schema: &Value) {
    let variants = schema.get("oneOf").and_then(Value::as_array).cloned().unwrap_or_default();
    let mut names = Vec::new();
    for v in &variants {
        let props = v.get("properties").and_then(Value::as_object).cloned().unwrap_or_default();
        let wire = props.get("type").and_then(|t| t.get("const")).and_then(Value::as_str).unwrap_or("unknown");
        let iface = format!("{prefix}{}Event", pascal(wire));
        doc(out, v, "");
        out.push_str(&format!("export interface {iface} {{\n"));
        let required: Vec<&str> = v
            .get("required")
            .and_then(Value::as_array)
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let mut keys: Vec<(&String, &Value)> = props.iter().collect();
        keys.sort_by_key(|(k, _)| (k.as_str() != "type", k.to_string()));
        for (k, p) in keys {
            doc(out, p, "  ");
            let opt = if required.contains(&k.as_str()) { "" } else { "?" };
            out.push_str(&format!("  {k}{opt}: {};\n", ts_type(p)));
        }
        out.push_str("}\n\n");
        names.push(iface);
    }
    out.push_str(&format!("export type {name} =\n  | {};\n\n", names.join("\n  | ")));
}

fn ts_type(v: &Value) -> String {
    let Some(o) = v.as_object() else { return "unknown".into() };
    if let Some(c) = o.get("const") {
        return c.to_string();
    }
    if let Some(r) = o.get("$ref").and_then(Value::as_str) {
        return r.rsplit('/').next().unwrap_or("unknown").to_owned();
    }
    if let Some(Value::Array(e)) = o.get("enum") {
        return e.iter().map(Value::to_string).collect::<Vec<_>>().join(" | ");
    }
    for key in ["oneOf", "anyOf"] {
        if let Some(Value::Array(alts)) = o.get(key) {
            return alts.iter().map(|a| open_string(a, alts.len())).collect::<Vec<_>>().join(" | ");
        }
    }
    match o.get("type") {
        Some(Value::String(t)) => scalar(t, o),
        Some(Value::Array(ts)) => {
            ts.iter().filter_map(Value::as_str).map(|t| scalar(t, o)).collect::<Vec<_>>().join(" | ")
        }
        _ => "unknown".into(),
    }
}

/// In a union, a bare `string` alternative means "any other name": keep the known names useful.
fn open_string(v: &Value, alternatives: usize) -> String {
    let t = ts_type(v);
    if t == "string" && alternatives > 1 { "(string & {})".into() } else { t }
}

fn scalar(t: &str, o: &Map<String, Value>) -> String {
    match t {
        "string" => "string",
        "integer" | "number" => "number",
        "boolean" => "boolean",
        "null" => "null",
        "array" => {
            let item = o.get("items").map_or_else(|| "unknown".to_owned(), ts_type);
            return if item.contains(' ') { format!("({item})[]") } else { format!("{item}[]") };
        }
        "object" => return object_type(o),
        _ => "unknown",
    }
    .into()
}

/// An object schema as an inline TypeScript type (`{ a: string; b?: number }`).
fn object_type(o: &Map<String, Value>) -> String {
    let Some(Value::Object(props)) = o.get("properties") else { return "Record<string, unknown>".into() };
    let required: Vec<&str> = o
        .get("required")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let fields: Vec<String> = props
        .iter()
        .map(|(k, v)| format!("{k}{}: {}", if required.contains(&k.as_str()) { "" } else { "?" }, ts_type(v)))
        .collect();
    format!("{{ {} }}", fields.join("; "))
}
