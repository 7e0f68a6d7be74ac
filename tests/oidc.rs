//! End-user sign-in with OpenID Connect against the real server: a test issuer on loopback
//! (RSA keys generated here, discovery document and JWKS served over HTTP) signs tokens; a
//! valid one creates a session owned by the token's user; a wrong issuer, a wrong audience, an
//! expired token, an unknown `kid`, `alg: none` and an HS256 token keyed with the issuer's
//! public key are all refused with 401; a rotated key is picked up; the skew is bounded.

mod common;

use std::sync::{Arc, Mutex};

use axum::Json;
use axum::routing::get;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use rsa::pkcs1::EncodeRsaPrivateKey;
use rsa::traits::PublicKeyParts;
use serde_json::{Value, json};

const AUDIENCE: &str = "kotodama-web";
const ADMIN_KEY: &str = "oidc-test-admin-key-0123456789";

/// One RSA signing key of the issuer.
struct IssuerKey {
    kid: String,
    encoding: EncodingKey,
    jwk: Value,
    /// PKCS#1 DER of the public key, what a confused verifier might use as an HMAC secret.
    public_der: Vec<u8>,
}

impl IssuerKey {
    fn generate(kid: &str) -> IssuerKey {
        let private = rsa::RsaPrivateKey::new(&mut rand08::rngs::OsRng, 2048).expect("RSA key");
        let der = private.to_pkcs1_der().expect("PKCS#1 DER");
        let public = private.to_public_key();
        let jwk = json!({
            "kty": "RSA", "use": "sig", "alg": "RS256", "kid": kid,
            "n": URL_SAFE_NO_PAD.encode(public.n().to_bytes_be()),
            "e": URL_SAFE_NO_PAD.encode(public.e().to_bytes_be()),
        });
        let public_der = rsa::pkcs1::EncodeRsaPublicKey::to_pkcs1_der(&public).unwrap().as_bytes().to_vec();
        IssuerKey { kid: kid.into(), encoding: EncodingKey::from_rsa_der(der.as_bytes()), jwk, public_der }
    }
}

/// A test identity provider on loopback: discovery + JWKS (swappable keys), counting fetches.
struct Issuer {
    url: String,
    published: Arc<Mutex<Vec<Value>>>,
    jwks_fetches: Arc<Mutex<u32>>,
}

impl Issuer {
    async fn start() -> Issuer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/realms/test", listener.local_addr().unwrap());
        let published = Arc::new(Mutex::new(Vec::new()));
        let jwks_fetches = Arc::new(Mutex::new(0));
        let (keys, fetches, issuer) = (Arc::clone(&published), Arc::clone(&jwks_fetches), url.clone());
        let app = axum::Router::new()
            .route(
                "/realms/test/.well-known/openid-configuration",
                get(move || {
                    let issuer = issuer.clone();
                    async move { Json(json!({"issuer": issuer, "jwks_uri": format!("{issuer}/certs")})) }
                }),
            )
            .route(
                "/realms/test/certs",
                get(move || {
                    *fetches.lock().unwrap() += 1;
                    let keys = keys.lock().unwrap().clone();
                    async move { Json(json!({ "keys": keys })) }
                }),
            );
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Issuer { url, published, jwks_fetches }
    }

    fn publish(&self, keys: &[&IssuerKey]) {
        *self.published.lock().unwrap() = keys.iter().map(|k| k.jwk.clone()).collect();
    }

    fn fetches(&self) -> u32 {
        *self.jwks_fetches.lock().unwrap()
    }

    /// Claims for `sub` valid for 5 minutes, from this issuer to our audience.
    fn claims(&self, sub: &str) -> Value {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        json!({"iss": self.url, "aud": AUDIENCE, "sub": sub, "iat": now, "exp": now + 300, "roles": ["listener"]})
    }
}

fn sign(key: &IssuerKey, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(key.kid.clone());
    encode(&header, claims, &key.encoding).unwrap()
}

async fn server(issuer: &Issuer, skew_secs: u64) -> TestServer {
    let url = issuer.url.clone();
    TestServer::start_with(move |c| {
        c.oidc.issuer = Some(url);
        c.oidc.audience = vec![AUDIENCE.into()];
        c.oidc.max_skew_secs = skew_secs;
        c.oidc.jwks_min_refetch_secs = 0;
        c.admin_api_keys = vec![ADMIN_KEY.into()];
    })
    .await
}

/// (status, problem code) of POST /v1/sessions with `token`.
async fn create_with(ts: &TestServer, token: &str, body: Value) -> (u16, Value) {
    let r = ts.http.post(format!("{}/v1/sessions", ts.base)).bearer_auth(token).json(&body).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_token_creates_a_session_owned_by_its_user_and_bad_ones_get_401() {
    let issuer = Issuer::start().await;
    let key = IssuerKey::generate("k1");
    let stranger = IssuerKey::generate("k1");
    issuer.publish(&[&key]);
    let ts = server(&issuer, 30).await;

    let (status, body) = create_with(&ts, &sign(&key, &issuer.claims("alice")), json!({})).await;
    assert_eq!(status, 201, "valid token: {body}");
    let export = get_json(&ts.http, &format!("{}/v1/users/alice/data", ts.base), ADMIN_KEY).await;
    assert_eq!(export["sessions"][0]["id"], body["session_id"], "the session belongs to the token's user: {export}");

    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let mut wrong_iss = issuer.claims("alice");
    wrong_iss["iss"] = json!("http://127.0.0.1:1/realms/other");
    let mut wrong_aud = issuer.claims("alice");
    wrong_aud["aud"] = json!("someone-else");
    let mut expired = issuer.claims("alice");
    expired["exp"] = json!(now - 120);
    let mut no_exp = issuer.claims("alice");
    no_exp.as_object_mut().unwrap().remove("exp");
    let mut unknown_kid = Header::new(Algorithm::RS256);
    unknown_kid.kid = Some("k-unknown".into());
    let unknown_kid = encode(&unknown_kid, &issuer.claims("alice"), &key.encoding).unwrap();
    let none = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT","kid":"k1"}"#),
        URL_SAFE_NO_PAD.encode(issuer.claims("alice").to_string())
    );
    let mut hs = Header::new(Algorithm::HS256);
    hs.kid = Some("k1".into());
    let confused = encode(&hs, &issuer.claims("alice"), &EncodingKey::from_secret(&key.public_der)).unwrap();
    let forged = sign(&stranger, &issuer.claims("alice"));

    for (what, token, code) in [
        ("wrong issuer", sign(&key, &wrong_iss), "id_token_invalid"),
        ("wrong audience", sign(&key, &wrong_aud), "id_token_invalid"),
        ("expired beyond the skew", sign(&key, &expired), "id_token_expired"),
        ("no exp", sign(&key, &no_exp), "id_token_invalid"),
        ("unknown kid", unknown_kid, "id_token_invalid"),
        ("alg none", none, "id_token_invalid"),
        ("HS256 keyed with the public key", confused, "id_token_invalid"),
        ("signed by another key with the same kid", forged, "id_token_invalid"),
        ("garbage", "a.b.c".to_owned(), "id_token_invalid"),
        ("not a JWT nor a key", "just-some-string".to_owned(), "api_key_invalid"),
    ] {
        let (status, body) = create_with(&ts, &token, json!({})).await;
        assert_eq!((status, body["code"].as_str().unwrap_or_default()), (401, code), "{what}: {body}");
        assert!(!body.to_string().contains(&token), "{what}: the answer echoes the token");
    }
    let r = ts.http.post(format!("{}/v1/sessions", ts.base)).json(&json!({})).send().await.unwrap();
    assert_eq!(r.status(), 401, "with OIDC configured, creating a session needs a credential even on loopback");

    // Within the skew an expired token still passes; the body cannot claim another user.
    let mut just_expired = issuer.claims("bob");
    just_expired["exp"] = json!(now - 10);
    assert_eq!(create_with(&ts, &sign(&key, &just_expired), json!({})).await.0, 201, "10 s late, 30 s skew");
    let (status, body) = create_with(&ts, &sign(&key, &issuer.claims("bob")), json!({"user_id": "alice"})).await;
    assert_eq!((status, body["code"].as_str()), (403, Some("user_id_mismatch")));
    ts.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_key_is_fetched_when_a_token_names_it_and_the_old_one_then_stops_working() {
    let issuer = Issuer::start().await;
    let old = IssuerKey::generate("2026-01");
    let new = IssuerKey::generate("2026-02");
    issuer.publish(&[&old]);
    let ts = server(&issuer, 0).await;

    assert_eq!(create_with(&ts, &sign(&old, &issuer.claims("carol")), json!({})).await.0, 201);
    assert_eq!(create_with(&ts, &sign(&old, &issuer.claims("carol")), json!({})).await.0, 201);
    assert_eq!(issuer.fetches(), 1, "the key set is cached between tokens");

    issuer.publish(&[&new]);
    let (status, body) = create_with(&ts, &sign(&new, &issuer.claims("carol")), json!({})).await;
    assert_eq!(status, 201, "a token with the new kid makes the server fetch the keys again: {body}");
    assert_eq!(issuer.fetches(), 2);
    // The cached set is the new one now: the retired key is refused.
    let (status, body) = create_with(&ts, &sign(&old, &issuer.claims("carol")), json!({})).await;
    assert_eq!((status, body["code"].as_str()), (401, Some("id_token_invalid")), "{body}");
    ts.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_issuer_is_503_not_401() {
    let mut issuer = Issuer::start().await;
    let key = IssuerKey::generate("k1");
    issuer.url = "http://127.0.0.1:9/realms/test".into();
    let ts = server(&issuer, 0).await;
    let (status, body) = create_with(&ts, &sign(&key, &issuer.claims("dave")), json!({})).await;
    assert_eq!((status, body["code"].as_str()), (503, Some("unavailable")), "{body}");
    ts.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_opens_to_users_with_the_admin_role_only() {
    let issuer = Issuer::start().await;
    let key = IssuerKey::generate("k1");
    issuer.publish(&[&key]);
    let ts = server(&issuer, 0).await;
    let admin_get = |token: String| {
        let req = ts.http.get(format!("{}/v1/admin/characters", ts.base)).bearer_auth(token);
        async move { req.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(admin_get(sign(&key, &issuer.claims("erin"))).await, 403, "a signed-in user without the role");
    let mut admin = issuer.claims("frank");
    admin["roles"] = json!(["listener", "kotodama-admin"]);
    assert_eq!(admin_get(sign(&key, &admin)).await, 200, "a signed-in user with the admin role");
    let log = get_json(&ts.http, &format!("{}/v1/admin/audit", ts.base), ADMIN_KEY).await;
    let actors: Vec<&str> = log.as_array().unwrap().iter().filter_map(|e| e["actor"].as_str()).collect();
    assert!(actors.contains(&"user:frank") && !actors.contains(&"user:erin"), "{log}");
    ts.server.shutdown().await.unwrap();
}
