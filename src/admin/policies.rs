//! Moderation policies and their allow/deny lists under `/v1/admin/policies`, versioned: every
//! change stores a new version (`moderation_policies`, migration 0008) and replaces the node's
//! catalog ([`crate::moderation::policies`]) at once; other nodes reload it within
//! [`super::CATALOG_REFRESH`]. New sessions use the newest version; a live session keeps the
//! version it started with, and its flags name that version.
//!
//! | route | success |
//! |---|---|
//! | `GET /v1/admin/policies` | 200 `[{"id","version","source":"config"|"admin","policy":{...},"updated_at"?,"updated_by"?}]` |
//! | `GET /v1/admin/policies/{id}` | 200 one of those; 404 `unknown_policy` |
//! | `PUT /v1/admin/policies/{id}` | 200 the new version (body: a policy as in `[moderation]`, JSON); 422 `bad_policy` |
//! | `DELETE /v1/admin/policies/{id}` | 200 `{"id","deleted":true,"version"}` (`default` reverts to `[moderation]`); 409 `policy_in_use` while a character names it |
//! | `GET /v1/admin/policies/{id}/versions` | 200 every stored version, newest first (`policy` null: deleted) |
//! | `GET /v1/admin/policies/{id}/lists/{allow|deny}` | 200 `{"id","list","version","phrases":[...]}` |
//! | `PUT /v1/admin/policies/{id}/lists/{allow|deny}` | 200 the same after storing a new version with the list replaced (body `{"phrases":[...]}`) |
//!
//! A stored policy never holds the endpoint's API key: a stored endpoint with the configured
//! endpoint's URL uses the configured key.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::Path;
use axum::extract::rejection::PathRejection;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::{Value, json};
use signaling::problem::ApiError;

use super::store::{AdminStore, PolicyRecord};
use super::{Admin, AdminState, json_body, json_response, path_id, path_id_extractor, rfc3339, storage};
use crate::config::ModerationSettings;
use crate::moderation::policies::{DEFAULT_POLICY, PolicyVersion};
use crate::session::SessionManager;
use crate::store::StoreError;

/// Largest policy body (64 KiB, like a character).
pub const MAX_POLICY_BYTES: usize = 64 * 1024;

/// Load the stored policies into `manager`'s catalog (unreadable rows are logged and skipped).
pub(super) async fn reload(manager: &Arc<SessionManager>, store: &AdminStore) -> Result<(), StoreError> {
    let mut current = BTreeMap::new();
    for r in store.policies().await? {
        let Some(spec) = &r.spec else { continue };
        match serde_json::from_str::<ModerationSettings>(spec) {
            Ok(settings) => {
                current.insert(r.id, PolicyVersion { version: r.version, settings });
            }
            Err(e) => tracing::warn!(policy = %r.id, error = %e, "stored moderation policy unreadable; skipped"),
        }
    }
    manager.policies().replace(current);
    Ok(())
}

fn unknown_policy(id: &str) -> ApiError {
    ApiError::not_found("unknown_policy", format!("no moderation policy `{id}`"))
}

fn policy_id(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    path_id(path, unknown_policy)
}

path_id_extractor!(
    /// A policy id (404 `unknown_policy` when malformed).
    pub(super) PolicyId = policy_id
);

/// A policy as listed: the newest stored version, or `default` as configured (version 0).
fn listed(st: &AdminState, id: &str, stored: Option<&PolicyRecord>) -> Option<Value> {
    let (_, settings) = st.manager.policies().get(id)?;
    let mut v = json!({"id": id, "version": 0, "source": "config", "policy": settings});
    if let Some(r) = stored.filter(|r| r.spec.is_some()) {
        v["version"] = json!(r.version);
        v["source"] = json!("admin");
        v["updated_at"] = json!(rfc3339(r.created_at));
        v["updated_by"] = json!(r.created_by);
    }
    Some(v)
}

/// Policy `id` as listed, after reloading the catalog (404 when there is none).
async fn current(st: &AdminState, id: &str) -> Result<Value, ApiError> {
    reload(&st.manager, &st.store).await.map_err(storage)?;
    let versions = st.store.policy_versions(id).await.map_err(storage)?;
    listed(st, id, versions.first()).ok_or_else(|| unknown_policy(id))
}

pub(super) async fn list(Admin { st, caller }: Admin) -> Result<Response, ApiError> {
    st.record(&caller, "policy.list", None, None).await?;
    reload(&st.manager, &st.store).await.map_err(storage)?;
    let stored = st.store.policies().await.map_err(storage)?;
    let mut out: Vec<Value> =
        listed(&st, DEFAULT_POLICY, stored.iter().find(|r| r.id == DEFAULT_POLICY)).into_iter().collect();
    out.extend(stored.iter().filter(|r| r.id != DEFAULT_POLICY).filter_map(|r| listed(&st, &r.id, Some(r))));
    Ok(json_response(StatusCode::OK, &out))
}

pub(super) async fn get(Admin { st, caller }: Admin, PolicyId(id): PolicyId) -> Result<Response, ApiError> {
    st.record(&caller, "policy.get", Some(&id), None).await?;
    Ok(json_response(StatusCode::OK, &current(&st, &id).await?))
}

/// `settings` checked like the `[moderation]` section (422 `bad_policy` naming the key).
fn checked(settings: ModerationSettings) -> Result<ModerationSettings, ApiError> {
    settings.validate().map_err(|e| ApiError::unprocessable("bad_policy", e.to_string()))?;
    Ok(settings)
}

/// Store `settings` as the next version of `id`, audit-logged first; the new version as listed.
async fn store_version(
    st: &AdminState,
    caller: &signaling::identity::Caller,
    action: &str,
    id: &str,
    settings: &ModerationSettings,
) -> Result<Value, ApiError> {
    let spec = serde_json::to_string(settings).map_err(ApiError::internal)?;
    let detail =
        json!({"deny": settings.deny.len(), "allow": settings.allow.len(), "categories": settings.categories.len()});
    st.record(caller, action, Some(id), Some(detail)).await?;
    st.store.put_policy(id, Some(&spec), &caller.audit_name()).await.map_err(storage)?;
    current(st, id).await
}

pub(super) async fn put(
    Admin { st, caller }: Admin,
    PolicyId(id): PolicyId,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let value = json_body(&headers, body, MAX_POLICY_BYTES, true).await?.unwrap_or_else(|| json!({}));
    if !value.is_object() {
        return Err(ApiError::bad_request("bad_json", "a policy is a JSON object"));
    }
    let settings =
        checked(serde_json::from_value(value).map_err(|e| ApiError::unprocessable("bad_policy", e.to_string()))?)?;
    Ok(json_response(StatusCode::OK, &store_version(&st, &caller, "policy.put", &id, &settings).await?))
}

pub(super) async fn delete(Admin { st, caller }: Admin, PolicyId(id): PolicyId) -> Result<Response, ApiError> {
    let stored = st.store.policy_versions(&id).await.map_err(storage)?;
    if stored.first().is_none_or(|r| r.spec.is_none()) {
        return Err(unknown_policy(&id));
    }
    let users: Vec<String> = st
        .manager
        .characters()
        .iter()
        .filter(|c| c.moderation.as_ref().and_then(|m| m.policy.as_deref()) == Some(id.as_str()))
        .map(|c| c.id.clone())
        .collect();
    if !users.is_empty() {
        let detail = format!("characters {} use this policy; point them elsewhere first", users.join(", "));
        return Err(ApiError::conflict("policy_in_use", detail));
    }
    st.record(&caller, "policy.delete", Some(&id), None).await?;
    let version = st.store.put_policy(&id, None, &caller.audit_name()).await.map_err(storage)?;
    reload(&st.manager, &st.store).await.map_err(storage)?;
    Ok(json_response(StatusCode::OK, &json!({"id": id, "deleted": true, "version": version})))
}

pub(super) async fn versions(Admin { st, caller }: Admin, PolicyId(id): PolicyId) -> Result<Response, ApiError> {
    st.record(&caller, "policy.versions", Some(&id), None).await?;
    let stored = st.store.policy_versions(&id).await.map_err(storage)?;
    if stored.is_empty() && id != DEFAULT_POLICY {
        return Err(unknown_policy(&id));
    }
    let out: Vec<Value> = stored
        .iter()
        .map(|r| {
            let policy = r.spec.as_deref().and_then(|s| serde_json::from_str::<Value>(s).ok());
            json!({"id": r.id, "version": r.version, "policy": policy, "deleted": r.spec.is_none(),
                   "updated_at": rfc3339(r.created_at), "updated_by": r.created_by})
        })
        .collect();
    Ok(json_response(StatusCode::OK, &out))
}

/// `allow` or `deny` from the path, with the policy id.
fn list_path(path: Result<Path<(String, String)>, PathRejection>) -> Result<(String, String), ApiError> {
    let Ok(Path((id, list))) = path else { return Err(unknown_policy("")) };
    if !crate::moderation::policies::valid_policy_id(&id) {
        return Err(unknown_policy(&id));
    }
    if list != "allow" && list != "deny" {
        return Err(ApiError::not_found("unknown_list", "a policy has the lists allow and deny"));
    }
    Ok((id, list))
}

fn list_view(policy: &Value, list: &str) -> Value {
    json!({"id": policy["id"], "list": list, "version": policy["version"], "phrases": policy["policy"][list]})
}

pub(super) async fn get_list(
    Admin { st, caller }: Admin,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, ApiError> {
    let (id, list) = list_path(path)?;
    st.record(&caller, &format!("policy.{list}.get"), Some(&id), None).await?;
    Ok(json_response(StatusCode::OK, &list_view(&current(&st, &id).await?, &list)))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Phrases {
    phrases: Vec<String>,
}

pub(super) async fn put_list(
    Admin { st, caller }: Admin,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let (id, list) = list_path(path)?;
    let expected = || ApiError::bad_request("bad_json", "expected {\"phrases\": [\"...\"]}");
    let value = json_body(&headers, body, MAX_POLICY_BYTES, true).await?.ok_or_else(expected)?;
    let Phrases { phrases } = serde_json::from_value(value).map_err(|_| expected())?;
    let phrases: Vec<String> = phrases.iter().map(|p| p.trim().to_owned()).filter(|p| !p.is_empty()).collect();
    reload(&st.manager, &st.store).await.map_err(storage)?;
    let (_, mut settings) = st.manager.policies().get(&id).ok_or_else(|| unknown_policy(&id))?;
    if list == "allow" {
        settings.allow = phrases;
    } else {
        settings.deny = phrases;
    }
    let action = format!("policy.{list}.put");
    let policy = store_version(&st, &caller, &action, &id, &checked(settings)?).await?;
    Ok(json_response(StatusCode::OK, &list_view(&policy, &list)))
}
