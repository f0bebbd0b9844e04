//! A fake Kubernetes API server behind kube's client (the tower-test pattern), with enough
//! state to run several reconciles in a row, plus fake bricks for the health probe.
//!
//! The fake stores objects by their URL path, applies server-side-apply bodies, JSON and merge
//! patches, filters lists by label selector, and records every call so tests can assert on
//! exactly what the operator asked for. A small stand-in for the StatefulSet controller
//! creates pods and claims the way Kubernetes would.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use kube::runtime::controller::Action;
use mortar_common::tls::TlsFiles;
use mortar_operator::controller::{self, Context, Error};
use mortar_operator::crd::{SharedStorageCluster, SharedStorageClusterSpec};
use mortar_operator::health::{BrickHealth, HealthError, HealthProbe};
use mortar_operator::metrics::Metrics;
use mortar_operator::resources::Volfile;
use serde_json::{Value, json};

pub const NS: &str = "ns";
pub const NAME: &str = "vol";
pub const SSC_PATH: &str = "/apis/mortar.dev/v1alpha1/namespaces/ns/sharedstorageclusters/vol";
pub const STS_PATH: &str = "/apis/apps/v1/namespaces/ns/statefulsets/vol-brick";
pub const CM_PATH: &str = "/api/v1/namespaces/ns/configmaps/vol-volfile";
pub const PODS_PATH: &str = "/api/v1/namespaces/ns/pods";
pub const PVCS_PATH: &str = "/api/v1/namespaces/ns/persistentvolumeclaims";
pub const SECRETS_PATH: &str = "/api/v1/namespaces/ns/secrets";
pub const CA_SECRET_PATH: &str = "/api/v1/namespaces/ns/secrets/vol-ca";
pub const BRICK_SECRET_PATH: &str = "/api/v1/namespaces/ns/secrets/vol-brick-tls";
pub const CLIENT_SECRET_PATH: &str = "/api/v1/namespaces/ns/secrets/vol-client-tls";
pub const ADMIN_SECRET_PATH: &str = "/api/v1/namespaces/ns/secrets/vol-admin-tls";
pub const DEFAULT_IMAGE: &str = "mortar:test";

#[derive(Clone, Debug)]
pub struct Call {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub content_type: String,
    pub body: Value,
}

#[derive(Default)]
struct State {
    objects: BTreeMap<String, Value>,
    calls: Vec<Call>,
    /// (method, path suffix, HTTP code, message): answered instead of doing the call.
    rejections: Vec<(Method, String, u16, String)>,
    next_uid: u64,
}

#[derive(Default)]
pub struct FakeApi {
    state: Mutex<State>,
}

fn status_body(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Status", "metadata": {},
        "status": "Failure", "reason": reason, "message": message, "code": code,
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

fn label_selector(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter_map(|kv| kv.strip_prefix("labelSelector="))
        .flat_map(|sel| {
            percent_decode(sel)
                .split(',')
                .filter_map(|term| {
                    term.split_once('=')
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

fn matches_labels(obj: &Value, selector: &[(String, String)]) -> bool {
    selector
        .iter()
        .all(|(k, v)| obj["metadata"]["labels"][k].as_str() == Some(v.as_str()))
}

/// Segments after `namespaces/<ns>/`: 1 is a collection, 2 an object, 3 a subresource.
fn split_path(path: &str) -> (String, usize) {
    let idx = path.find("/namespaces/").expect("namespaced path");
    let rest: Vec<&str> = path[idx + "/namespaces/".len()..].split('/').collect();
    (path.to_string(), rest.len() - 1)
}

impl FakeApi {
    pub fn put(&self, path: &str, obj: Value) {
        self.state
            .lock()
            .unwrap()
            .objects
            .insert(path.to_string(), obj);
    }

    pub fn get(&self, path: &str) -> Option<Value> {
        self.state.lock().unwrap().objects.get(path).cloned()
    }

    pub fn remove(&self, path: &str) -> Option<Value> {
        self.state.lock().unwrap().objects.remove(path)
    }

    /// Objects directly under a collection path.
    pub fn list(&self, collection: &str) -> Vec<(String, Value)> {
        let prefix = format!("{collection}/");
        self.state
            .lock()
            .unwrap()
            .objects
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix) && !k[prefix.len()..].contains('/'))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    pub fn calls(&self) -> Vec<Call> {
        self.state.lock().unwrap().calls.clone()
    }

    pub fn clear_calls(&self) {
        self.state.lock().unwrap().calls.clear();
    }

    pub fn reject(&self, method: Method, path_suffix: &str, code: u16, message: &str) {
        self.state.lock().unwrap().rejections.push((
            method,
            path_suffix.to_string(),
            code,
            message.to_string(),
        ));
    }

    fn handle(&self, call: Call) -> (StatusCode, Value) {
        let mut st = self.state.lock().unwrap();
        st.calls.push(call.clone());
        if let Some((_, _, code, msg)) = st
            .rejections
            .iter()
            .find(|(m, p, _, _)| *m == call.method && call.path.ends_with(p.as_str()))
            .cloned()
        {
            return (
                StatusCode::from_u16(code).unwrap(),
                status_body(code, "Invalid", &msg),
            );
        }
        let (path, depth) = split_path(&call.path);
        match (call.method.clone(), depth) {
            (Method::GET, 1) => {
                let selector = label_selector(&call.query);
                let prefix = format!("{path}/");
                let items: Vec<Value> = st
                    .objects
                    .iter()
                    .filter(|(k, _)| k.starts_with(&prefix) && !k[prefix.len()..].contains('/'))
                    .map(|(_, v)| v.clone())
                    .filter(|v| matches_labels(v, &selector))
                    .collect();
                (
                    StatusCode::OK,
                    json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "1"}, "items": items}),
                )
            }
            (Method::GET, 2) => match st.objects.get(&path) {
                Some(o) => (StatusCode::OK, o.clone()),
                None => (
                    StatusCode::NOT_FOUND,
                    status_body(404, "NotFound", &format!("{path} not found")),
                ),
            },
            (Method::POST, 1) => {
                let name = call.body["metadata"]["name"]
                    .as_str()
                    .unwrap_or("unnamed")
                    .to_string();
                let key = format!("{path}/{name}");
                if st.objects.contains_key(&key) {
                    return (
                        StatusCode::CONFLICT,
                        status_body(409, "AlreadyExists", "exists"),
                    );
                }
                st.objects.insert(key, call.body.clone());
                (StatusCode::CREATED, call.body)
            }
            (Method::DELETE, 2) => match st.objects.remove(&path) {
                Some(o) => (StatusCode::OK, o),
                None => (
                    StatusCode::NOT_FOUND,
                    status_body(404, "NotFound", &format!("{path} not found")),
                ),
            },
            (Method::PATCH, 2 | 3) => {
                let (key, subresource) = if depth == 3 {
                    let (k, sub) = path.rsplit_once('/').unwrap();
                    (k.to_string(), Some(sub.to_string()))
                } else {
                    (path.clone(), None)
                };
                let existing = st.objects.get(&key).cloned();
                let updated = if call.content_type.starts_with("application/apply-patch") {
                    let mut new = call.body.clone();
                    match (existing, subresource.as_deref()) {
                        (Some(mut old), Some("status")) => {
                            old["status"] = new["status"].take();
                            old
                        }
                        (None, Some(_)) => {
                            return (
                                StatusCode::NOT_FOUND,
                                status_body(404, "NotFound", "no object"),
                            );
                        }
                        (Some(old), _) => {
                            for field in [
                                "uid",
                                "resourceVersion",
                                "creationTimestamp",
                                "generation",
                                "finalizers",
                                "deletionTimestamp",
                            ] {
                                if !old["metadata"][field].is_null() {
                                    new["metadata"][field] = old["metadata"][field].clone();
                                }
                            }
                            if !old["status"].is_null() {
                                new["status"] = old["status"].clone();
                            }
                            new
                        }
                        (None, _) => {
                            st.next_uid += 1;
                            new["metadata"]["uid"] = json!(format!("uid-{}", st.next_uid));
                            new
                        }
                    }
                } else {
                    let Some(mut old) = existing else {
                        return (
                            StatusCode::NOT_FOUND,
                            status_body(404, "NotFound", "no object"),
                        );
                    };
                    if call.content_type.starts_with("application/json-patch") {
                        let patch: json_patch::Patch =
                            serde_json::from_value(call.body.clone()).unwrap();
                        // The API server's JSON patch treats a missing field as null (kube's
                        // finalizer helper tests for that); json_patch does not.
                        if old["metadata"]["finalizers"].is_null() {
                            old["metadata"]["finalizers"] = Value::Null;
                        }
                        if let Err(e) = json_patch::patch(&mut old, &patch) {
                            return (
                                StatusCode::UNPROCESSABLE_ENTITY,
                                status_body(422, "Invalid", &e.to_string()),
                            );
                        }
                    } else {
                        json_patch::merge(&mut old, &call.body);
                    }
                    old
                };
                st.objects.insert(key, updated.clone());
                (StatusCode::OK, updated)
            }
            (m, d) => panic!("fake API server: unhandled {m} at depth {d}: {}", call.path),
        }
    }
}

/// Bricks that answer health probes as the test sets them; a brick nobody set is unreachable.
/// Up bricks report the generation of the volfile currently in the ConfigMap, as real bricks
/// that follow the file would.
pub struct FakeBricks {
    api: Arc<FakeApi>,
    bricks: Mutex<HashMap<i32, BrickHealth>>,
    /// The common name of the certificate of every probe that passed the TLS check.
    pub probed_as: Mutex<Vec<String>>,
}

/// A Secret's data, decoded, as the fake API server holds it.
pub fn secret_data(api: &FakeApi, path: &str) -> Option<BTreeMap<String, String>> {
    let secret: k8s_openapi::api::core::v1::Secret =
        serde_json::from_value(api.get(path)?).unwrap();
    Some(
        secret
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, String::from_utf8(v.0).unwrap()))
            .collect(),
    )
}

pub fn common_name(cert_pem: &str) -> String {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).unwrap();
    let cert = pem.parse_x509().unwrap();
    cert.subject()
        .iter_common_name()
        .next()
        .unwrap()
        .as_str()
        .unwrap()
        .to_string()
}

/// What a brick of the cluster does with a connection: it speaks only TLS, and only to a
/// peer whose certificate its CA (the CA Secret's `ca.crt`) signed, with an admin or brick
/// role for the operator's questions.
fn brick_accepts(api: &FakeApi, tls: Option<&TlsFiles>) -> Result<String, String> {
    let tls = tls.ok_or("plain TCP to a TLS brick")?;
    let ca = secret_data(api, CA_SECRET_PATH).ok_or("the cluster has no CA")?;
    let trusted = &ca["ca.crt"];
    let signer = x509_parser::pem::Pem::iter_from_buffer(trusted.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    let signer = signer.parse_x509().unwrap();
    let cert_pem = String::from_utf8(tls.cert.clone()).unwrap();
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).map_err(|e| e.to_string())?;
    let cert = pem.parse_x509().map_err(|e| e.to_string())?;
    cert.verify_signature(Some(signer.public_key()))
        .map_err(|_| "certificate of another CA")?;
    if String::from_utf8(tls.ca.clone()).unwrap() != *trusted {
        return Err("the client trusts another CA than the brick's".into());
    }
    let cn = common_name(&cert_pem);
    if !(cn.starts_with("admin/") || cn.starts_with("brick/")) {
        return Err(format!("{cn} may not ask for health"));
    }
    Ok(cn)
}

pub fn address(ordinal: i32) -> String {
    format!("vol-brick-{ordinal}.vol-brick.ns.svc:24100")
}

impl FakeBricks {
    pub fn set(&self, ordinal: i32, up: bool, heal_pending: u64) {
        self.bricks.lock().unwrap().insert(
            ordinal,
            BrickHealth {
                brick_id: format!("b{ordinal}"),
                volume: "data".into(),
                generation: 0,
                up,
                heal_pending,
                capacity_bytes: 10 << 30,
                free_bytes: 9 << 30,
                used_bytes: 1 << 30,
            },
        );
    }

    pub fn unreachable(&self, ordinal: i32) {
        self.bricks.lock().unwrap().remove(&ordinal);
    }

    pub fn all_up(&self, n: i32) {
        for i in 0..n {
            self.set(i, true, 0);
        }
    }
}

impl HealthProbe for FakeBricks {
    fn probe<'a>(
        &'a self,
        address_: &'a str,
        tls: Option<&'a TlsFiles>,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<BrickHealth, HealthError>> {
        Box::pin(async move {
            match brick_accepts(&self.api, tls) {
                Ok(cn) => self.probed_as.lock().unwrap().push(cn),
                Err(reason) => {
                    return Err(HealthError::Unreachable {
                        address: address_.to_string(),
                        reason,
                    });
                }
            }
            let ordinal = (0..64).find(|i| address(*i) == address_);
            let health = ordinal.and_then(|i| self.bricks.lock().unwrap().get(&i).cloned());
            match health {
                Some(mut h) => {
                    h.generation = current_volfile(&self.api).map_or(0, |v| v.generation);
                    Ok(h)
                }
                None => Err(HealthError::Timeout {
                    address: address_.to_string(),
                    timeout,
                }),
            }
        })
    }
}

pub fn current_volfile(api: &FakeApi) -> Option<Volfile> {
    let cm = api.get(CM_PATH)?;
    Volfile::from_yaml(cm["data"]["volfile.yaml"].as_str()?).ok()
}

/// A kube client whose every request is answered by `api`.
pub fn fake_client(api: Arc<FakeApi>) -> kube::Client {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    tokio::spawn(async move {
        while let Some((request, send)) = handle.next_request().await {
            let (parts, body) = request.into_parts();
            let bytes = body.collect_bytes().await.unwrap();
            let call = Call {
                method: parts.method.clone(),
                path: parts.uri.path().to_string(),
                query: parts.uri.query().unwrap_or_default().to_string(),
                content_type: parts
                    .headers
                    .get(http::header::CONTENT_TYPE)
                    .map(|v| v.to_str().unwrap().to_string())
                    .unwrap_or_default(),
                body: if bytes.is_empty() {
                    Value::Null
                } else {
                    serde_json::from_slice(&bytes).unwrap()
                },
            };
            let (code, body) = api.handle(call);
            let response = Response::builder()
                .status(code)
                .header("content-type", "application/json")
                .body(Body::from(serde_json::to_vec(&body).unwrap()))
                .unwrap();
            send.send_response(response);
        }
    });
    kube::Client::new(service, NS)
}

pub struct Harness {
    pub api: Arc<FakeApi>,
    pub bricks: Arc<FakeBricks>,
    pub ctx: Arc<Context>,
}

impl Harness {
    pub fn new(spec: SharedStorageClusterSpec) -> Self {
        let api = Arc::new(FakeApi::default());
        let client = fake_client(api.clone());
        let bricks = Arc::new(FakeBricks {
            api: api.clone(),
            bricks: Mutex::default(),
            probed_as: Mutex::default(),
        });
        let ctx = Arc::new(Context::new(
            client,
            bricks.clone(),
            Arc::new(Metrics::new()),
            DEFAULT_IMAGE.into(),
            Some("test".into()),
        ));
        let mut ssc = SharedStorageCluster::new(NAME, spec);
        ssc.metadata.namespace = Some(NS.into());
        ssc.metadata.uid = Some("ssc-uid".into());
        ssc.metadata.generation = Some(1);
        api.put(SSC_PATH, serde_json::to_value(&ssc).unwrap());
        Self { api, bricks, ctx }
    }

    pub fn cluster(&self) -> SharedStorageCluster {
        serde_json::from_value(self.api.get(SSC_PATH).expect("cluster exists")).unwrap()
    }

    pub async fn reconcile(&self) -> Result<Action, Error> {
        controller::reconcile(Arc::new(self.cluster()), self.ctx.clone()).await
    }

    /// Change the spec as `kubectl edit` would (the API server bumps the generation).
    pub fn edit(&self, f: impl FnOnce(&mut SharedStorageClusterSpec)) {
        let mut ssc = self.cluster();
        f(&mut ssc.spec);
        ssc.metadata.generation = Some(ssc.metadata.generation.unwrap_or(1) + 1);
        self.api.put(SSC_PATH, serde_json::to_value(&ssc).unwrap());
    }

    pub fn status(&self) -> Value {
        self.api.get(SSC_PATH).unwrap()["status"].clone()
    }

    pub fn condition(&self, type_: &str) -> Value {
        self.status()["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == type_)
            .cloned()
            .unwrap_or(Value::Null)
    }

    pub fn calls_matching(&self, method: Method, path_prefix: &str) -> Vec<Call> {
        self.api
            .calls()
            .into_iter()
            .filter(|c| c.method == method && c.path.starts_with(path_prefix))
            .collect()
    }

    pub fn sts(&self) -> Value {
        self.api.get(STS_PATH).expect("StatefulSet applied")
    }

    pub fn pod_names(&self) -> Vec<String> {
        self.api
            .list(PODS_PATH)
            .into_iter()
            .map(|(_, v)| v["metadata"]["name"].as_str().unwrap().to_string())
            .collect()
    }

    pub fn claim_names(&self) -> Vec<String> {
        self.api
            .list(PVCS_PATH)
            .into_iter()
            .map(|(_, v)| v["metadata"]["name"].as_str().unwrap().to_string())
            .collect()
    }

    /// What the StatefulSet controller would do with `OnDelete`: record the template's
    /// revision, create missing pods (and their claims) at that revision, remove pods above
    /// `replicas`, and leave existing pods and all claims alone.
    pub fn run_statefulset_controller(&self) {
        let mut sts = self.sts();
        let replicas = sts["spec"]["replicas"].as_i64().unwrap() as i32;
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        sts["spec"]["template"].to_string().hash(&mut hasher);
        let revision = format!("vol-brick-{:x}", hasher.finish());
        sts["status"] =
            json!({"replicas": replicas, "updateRevision": revision, "currentRevision": revision});
        self.api.put(STS_PATH, sts.clone());
        let labels = sts["spec"]["selector"]["matchLabels"].clone();
        for (path, pod) in self.api.list(PODS_PATH) {
            let name = pod["metadata"]["name"].as_str().unwrap();
            let ordinal: i32 = name.rsplit('-').next().unwrap().parse().unwrap();
            if ordinal >= replicas {
                self.api.remove(&path);
            }
        }
        for i in 0..replicas {
            let name = format!("vol-brick-{i}");
            let pod_path = format!("{PODS_PATH}/{name}");
            if self.api.get(&pod_path).is_none() {
                let mut pod_labels = labels.clone();
                pod_labels["controller-revision-hash"] = json!(revision);
                pod_labels["apps.kubernetes.io/pod-index"] = json!(i.to_string());
                self.api.put(
                    &pod_path,
                    json!({
                        "apiVersion": "v1", "kind": "Pod",
                        "metadata": {"name": name, "namespace": NS, "labels": pod_labels},
                        "spec": {"nodeName": format!("node-{i}"), "containers": []},
                    }),
                );
            }
            let claim = format!("data-vol-brick-{i}");
            let claim_path = format!("{PVCS_PATH}/{claim}");
            if self.api.get(&claim_path).is_none() {
                self.api.put(
                    &claim_path,
                    json!({
                        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
                        "metadata": {"name": claim, "namespace": NS, "labels": labels.clone()},
                        "spec": {},
                    }),
                );
            }
        }
    }

    pub fn pod_revision(&self, ordinal: i32) -> String {
        self.api
            .get(&format!("{PODS_PATH}/vol-brick-{ordinal}"))
            .unwrap()["metadata"]["labels"]["controller-revision-hash"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Create the cluster, run the StatefulSet controller, bring every brick up: a Ready
    /// cluster of `n` bricks, with the call log cleared.
    pub async fn ready_cluster(spec: SharedStorageClusterSpec) -> Self {
        let n = spec.bricks;
        let h = Self::new(spec);
        h.reconcile().await.unwrap(); // adds the finalizer
        h.reconcile().await.unwrap(); // creates the objects
        h.run_statefulset_controller();
        h.bricks.all_up(n);
        h.reconcile().await.unwrap();
        assert_eq!(h.status()["phase"], "Ready", "{:#}", h.status());
        h.api.clear_calls();
        h
    }
}
