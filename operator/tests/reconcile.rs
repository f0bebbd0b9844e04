//! Reconciler tests against a fake API server: what the operator writes, step by step.

mod support;

use http::Method;
use mortar_operator::controller::FINALIZER;
use mortar_operator::crd::{ReclaimPolicy, SharedStorageClusterSpec};
use serde_json::{Value, json};
use support::*;

fn spec(bricks: i32) -> SharedStorageClusterSpec {
    SharedStorageClusterSpec {
        bricks,
        ..SharedStorageClusterSpec::default()
    }
}

fn applied(h: &Harness, path: &str) -> Vec<support::Call> {
    h.calls_matching(Method::PATCH, path)
        .into_iter()
        .filter(|c| c.content_type.starts_with("application/apply-patch"))
        .collect()
}

fn image(h: &Harness) -> String {
    h.sts()["spec"]["template"]["spec"]["containers"][0]["image"]
        .as_str()
        .unwrap()
        .to_string()
}

fn replicas(h: &Harness) -> i64 {
    h.sts()["spec"]["replicas"].as_i64().unwrap()
}

fn volfile_bricks(h: &Harness) -> Vec<String> {
    current_volfile(&h.api)
        .unwrap()
        .bricks
        .into_iter()
        .map(|b| b.id)
        .collect()
}

fn deleted_pods(h: &Harness) -> Vec<String> {
    h.calls_matching(Method::DELETE, PODS_PATH)
        .into_iter()
        .map(|c| c.path.rsplit('/').next().unwrap().to_string())
        .collect()
}

fn deleted_claims(h: &Harness) -> Vec<String> {
    h.calls_matching(Method::DELETE, PVCS_PATH)
        .into_iter()
        .map(|c| c.path.rsplit('/').next().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn first_create_adds_finalizer_then_builds_every_owned_object() {
    let h = Harness::new(spec(3));

    h.reconcile().await.unwrap();
    assert_eq!(
        h.cluster().metadata.finalizers,
        Some(vec![FINALIZER.to_string()])
    );
    assert!(
        h.api.get(STS_PATH).is_none(),
        "nothing is built before the finalizer is in place"
    );

    h.reconcile().await.unwrap();

    // Every owned object goes through server-side apply, forced, as mortar-operator.
    let applies = h
        .calls_matching(Method::PATCH, "/api")
        .into_iter()
        .filter(|c| !c.path.contains("sharedstorageclusters"))
        .collect::<Vec<_>>();
    assert!(!applies.is_empty());
    for call in &applies {
        assert!(
            call.content_type.starts_with("application/apply-patch"),
            "{} used {}",
            call.path,
            call.content_type
        );
        assert!(
            call.query.contains("fieldManager=mortar-operator"),
            "{}",
            call.query
        );
        assert!(call.query.contains("force=true"), "{}", call.query);
        assert_eq!(
            call.body["metadata"]["ownerReferences"][0]["uid"],
            "ssc-uid"
        );
        assert_eq!(
            call.body["metadata"]["ownerReferences"][0]["controller"],
            true
        );
    }

    let headless = h
        .api
        .get("/api/v1/namespaces/ns/services/vol-brick")
        .unwrap();
    assert_eq!(headless["spec"]["clusterIP"], "None");
    assert_eq!(headless["spec"]["publishNotReadyAddresses"], true);
    let client = h.api.get("/api/v1/namespaces/ns/services/vol").unwrap();
    assert_eq!(client["spec"]["type"], "ClusterIP");
    assert_eq!(client["spec"]["ports"][0]["port"], 24100);

    let volfile = current_volfile(&h.api).unwrap();
    assert_eq!(volfile.volume, "data");
    assert_eq!(volfile.generation, 1);
    assert_eq!(
        volfile.ping_timeout,
        Some(5),
        "the default pingTimeoutSeconds"
    );
    assert_eq!(
        volfile
            .bricks
            .iter()
            .map(|b| b.address.clone())
            .collect::<Vec<_>>(),
        (0..3).map(address).collect::<Vec<_>>()
    );

    let sts = h.sts();
    assert_eq!(sts["spec"]["replicas"], 3);
    assert_eq!(sts["spec"]["serviceName"], "vol-brick");
    assert_eq!(sts["spec"]["updateStrategy"]["type"], "OnDelete");
    assert_eq!(image(&h), DEFAULT_IMAGE);
    let pod = &sts["spec"]["template"]["spec"];
    assert_eq!(pod["terminationGracePeriodSeconds"], 60);
    assert!(
        pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
            .is_array()
    );
    assert_eq!(
        pod["containers"][0]["readinessProbe"]["tcpSocket"]["port"],
        "brick"
    );
    assert_eq!(pod["volumes"][0]["configMap"]["name"], "vol-volfile");
    assert_eq!(
        sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"],
        "10Gi"
    );

    let pdb = h
        .api
        .get("/apis/policy/v1/namespaces/ns/poddisruptionbudgets/vol-brick")
        .unwrap();
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);

    // Status goes through the status subresource; bricks are not up yet.
    let status_calls = h.calls_matching(Method::PATCH, &format!("{SSC_PATH}/status"));
    assert_eq!(status_calls.len(), 1);
    let status = h.status();
    assert_eq!(status["phase"], "Pending");
    assert_eq!(status["volfileGeneration"], 1);
    assert_eq!(status["readyBricks"], 0);
    assert_eq!(status["bricks"].as_array().unwrap().len(), 3);
    assert_eq!(h.condition("Available")["status"], "False");
    assert_eq!(h.condition("Progressing")["status"], "True");
    assert_eq!(h.condition("Progressing")["observedGeneration"], 1);

    // Reconciling again with nothing changed writes the same volfile generation.
    h.reconcile().await.unwrap();
    assert_eq!(current_volfile(&h.api).unwrap().generation, 1);
}

#[tokio::test]
async fn required_anti_affinity_and_storage_class_reach_the_statefulset() {
    let h = Harness::new(SharedStorageClusterSpec {
        anti_affinity: mortar_operator::crd::AntiAffinity::Required,
        storage: mortar_operator::crd::StorageSpec {
            size: k8s_openapi::apimachinery::pkg::api::resource::Quantity("1Gi".into()),
            storage_class_name: Some("fast".into()),
        },
        image: Some("registry/mortar:2".into()),
        ..spec(3)
    });
    h.reconcile().await.unwrap();
    h.reconcile().await.unwrap();
    let sts = h.sts();
    let required = &sts["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"];
    assert_eq!(required[0]["topologyKey"], "kubernetes.io/hostname");
    assert_eq!(
        required[0]["labelSelector"]["matchLabels"]["app.kubernetes.io/instance"],
        "vol"
    );
    let claim = &sts["spec"]["volumeClaimTemplates"][0]["spec"];
    assert_eq!(claim["storageClassName"], "fast");
    assert_eq!(claim["resources"]["requests"]["storage"], "1Gi");
    assert_eq!(image(&h), "registry/mortar:2");
}

#[tokio::test]
async fn all_bricks_up_is_ready() {
    let h = Harness::ready_cluster(spec(3)).await;
    let status = h.status();
    assert_eq!(status["phase"], "Ready");
    assert_eq!(status["readyBricks"], 3);
    assert_eq!(status["healPending"], 0);
    assert_eq!(status["capacity"], (10u64 << 30).to_string());
    let rows = status["bricks"].as_array().unwrap();
    assert_eq!(
        rows[1],
        json!({"id": "b1", "pod": "vol-brick-1", "node": "node-1", "address": address(1), "up": true, "healPending": 0})
    );
    assert_eq!(h.condition("Available")["status"], "True");
    assert_eq!(h.condition("Degraded")["status"], "False");
    assert_eq!(h.condition("Progressing")["status"], "False");

    // An event was recorded when the phase became Ready.
    let h2 = Harness::new(spec(1));
    h2.reconcile().await.unwrap();
    h2.reconcile().await.unwrap();
    h2.run_statefulset_controller();
    h2.bricks.all_up(1);
    h2.api.clear_calls();
    h2.reconcile().await.unwrap();
    let events = h2.calls_matching(Method::POST, "/apis/events.k8s.io/v1/namespaces/ns/events");
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].body["reason"], "Ready");
    assert_eq!(events[0].body["type"], "Normal");
    assert_eq!(events[0].body["regarding"]["name"], "vol");
}

#[tokio::test]
async fn one_brick_down_is_degraded() {
    let h = Harness::ready_cluster(spec(3)).await;
    h.bricks.unreachable(1);
    h.reconcile().await.unwrap();
    let status = h.status();
    assert_eq!(status["phase"], "Degraded");
    assert_eq!(status["readyBricks"], 2);
    assert_eq!(status["bricks"][1]["up"], false);
    assert_eq!(status["bricks"][0]["up"], true);
    assert_eq!(h.condition("Degraded")["status"], "True");
    assert!(
        h.condition("Degraded")["message"]
            .as_str()
            .unwrap()
            .contains("b1")
    );
    // Two of three still make a majority: the volume still takes writes.
    assert_eq!(h.condition("Available")["status"], "True");
    let events = h.calls_matching(Method::POST, "/apis/events.k8s.io/v1/namespaces/ns/events");
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].body["reason"], "Degraded");
    assert_eq!(events[0].body["type"], "Warning");

    // A brick whose process answers but says it is not up counts as down too.
    h.bricks.set(1, true, 0);
    h.bricks.set(2, false, 0);
    h.reconcile().await.unwrap();
    assert_eq!(h.status()["phase"], "Degraded");
    assert_eq!(h.status()["bricks"][2]["up"], false);

    // Losing the majority makes the volume unavailable.
    h.bricks.unreachable(0);
    h.reconcile().await.unwrap();
    assert_eq!(h.condition("Available")["status"], "False");
}

#[tokio::test]
async fn heal_pending_is_healing_until_done() {
    let h = Harness::ready_cluster(spec(3)).await;
    h.bricks.set(0, true, 7);
    h.bricks.set(2, true, 5);
    h.reconcile().await.unwrap();
    let status = h.status();
    assert_eq!(status["phase"], "Healing");
    assert_eq!(status["healPending"], 12);
    assert_eq!(status["readyBricks"], 1);
    assert_eq!(status["bricks"][0]["healPending"], 7);

    h.bricks.all_up(3);
    h.reconcile().await.unwrap();
    assert_eq!(h.status()["phase"], "Ready");
    assert_eq!(h.status()["healPending"], 0);
}

#[tokio::test]
async fn scale_up_adds_one_brick_at_a_time_after_each_heals() {
    let h = Harness::ready_cluster(spec(3)).await;
    h.edit(|s| s.bricks = 5);

    h.reconcile().await.unwrap();
    assert_eq!(volfile_bricks(&h), ["b0", "b1", "b2", "b3"]);
    assert_eq!(current_volfile(&h.api).unwrap().generation, 2);
    assert_eq!(replicas(&h), 4);
    assert_eq!(h.condition("Progressing")["reason"], "ScalingUp");
    assert_eq!(h.condition("Progressing")["observedGeneration"], 2);

    // b3's pod starts; until it answers, no further brick is added.
    h.run_statefulset_controller();
    h.reconcile().await.unwrap();
    assert_eq!(replicas(&h), 4);
    assert_eq!(h.status()["readyBricks"], 3);

    // Up but still being filled by a full heal: not ready, still no fifth brick.
    h.bricks.set(3, true, 1000);
    h.reconcile().await.unwrap();
    assert_eq!(replicas(&h), 4);
    assert_eq!(h.status()["phase"], "Healing");
    assert_eq!(h.status()["readyBricks"], 3);
    assert_eq!(h.condition("Progressing")["reason"], "WaitingForHeal");

    // Healed: b4 comes next.
    h.bricks.set(3, true, 0);
    h.reconcile().await.unwrap();
    assert_eq!(volfile_bricks(&h), ["b0", "b1", "b2", "b3", "b4"]);
    assert_eq!(current_volfile(&h.api).unwrap().generation, 3);
    assert_eq!(replicas(&h), 5);

    h.run_statefulset_controller();
    h.bricks.set(4, true, 0);
    h.reconcile().await.unwrap();
    assert_eq!(h.status()["phase"], "Ready");
    assert_eq!(h.status()["readyBricks"], 5);
    assert_eq!(h.condition("Progressing")["status"], "False");
    assert_eq!(current_volfile(&h.api).unwrap().generation, 3);
}

#[tokio::test]
async fn scale_down_removes_the_highest_brick_when_in_sync_and_drops_its_claim() {
    let h = Harness::ready_cluster(spec(5)).await;
    h.edit(|s| s.bricks = 3);

    // Not while a brick has something to heal.
    h.bricks.set(1, true, 3);
    h.reconcile().await.unwrap();
    assert_eq!(replicas(&h), 5);
    assert_eq!(volfile_bricks(&h).len(), 5);
    assert_eq!(h.condition("Progressing")["reason"], "WaitingForHeal");

    h.bricks.set(1, true, 0);
    h.reconcile().await.unwrap();
    assert_eq!(volfile_bricks(&h), ["b0", "b1", "b2", "b3"]);
    assert_eq!(current_volfile(&h.api).unwrap().generation, 2);
    assert_eq!(replicas(&h), 4);
    // The pod of b4 is still there: its claim waits.
    assert!(deleted_claims(&h).is_empty());

    h.run_statefulset_controller();
    h.reconcile().await.unwrap();
    assert_eq!(deleted_claims(&h), ["data-vol-brick-4"]);
    assert_eq!(replicas(&h), 3);
    assert_eq!(volfile_bricks(&h), ["b0", "b1", "b2"]);

    h.run_statefulset_controller();
    h.reconcile().await.unwrap();
    assert_eq!(deleted_claims(&h), ["data-vol-brick-4", "data-vol-brick-3"]);
    assert_eq!(h.status()["phase"], "Ready");
    assert_eq!(h.status()["bricks"].as_array().unwrap().len(), 3);
    assert!(h.claim_names().iter().all(|c| {
        ["data-vol-brick-0", "data-vol-brick-1", "data-vol-brick-2"].contains(&c.as_str())
    }));
}

#[tokio::test]
async fn scale_down_never_leaves_less_than_a_majority_of_the_current_set() {
    let h = Harness::ready_cluster(spec(2)).await;
    h.edit(|s| s.bricks = 1);
    h.reconcile().await.unwrap();
    assert_eq!(replicas(&h), 2);
    assert_eq!(volfile_bricks(&h).len(), 2);
    let progressing = h.condition("Progressing");
    assert_eq!(progressing["reason"], "ScaleDownRefused");
    assert!(
        progressing["message"]
            .as_str()
            .unwrap()
            .contains("majority")
    );
}

#[tokio::test]
async fn image_change_rolls_one_brick_at_a_time_waiting_for_heal() {
    let h = Harness::ready_cluster(spec(3)).await;
    let old_revision = h.pod_revision(0);
    h.edit(|s| s.image = Some("mortar:next".into()));

    h.reconcile().await.unwrap();
    assert_eq!(image(&h), "mortar:next");
    // The StatefulSet controller has not yet seen the new template: nothing is replaced.
    assert!(deleted_pods(&h).is_empty());

    h.run_statefulset_controller();
    h.reconcile().await.unwrap();
    assert_eq!(
        deleted_pods(&h),
        ["vol-brick-2"],
        "highest outdated brick first, one only"
    );
    assert_eq!(h.condition("Progressing")["reason"], "RollingUpdate");

    // The replacement comes up and must heal what it missed: nothing else is touched.
    h.bricks.unreachable(2);
    h.reconcile().await.unwrap();
    assert_eq!(deleted_pods(&h).len(), 1, "no second pod while b2 is down");
    h.run_statefulset_controller();
    assert_ne!(h.pod_revision(2), old_revision);
    h.bricks.set(2, true, 4);
    h.reconcile().await.unwrap();
    assert_eq!(deleted_pods(&h).len(), 1, "no second pod while b2 heals");

    h.bricks.set(2, true, 0);
    h.reconcile().await.unwrap();
    assert_eq!(deleted_pods(&h), ["vol-brick-2", "vol-brick-1"]);

    h.run_statefulset_controller();
    h.reconcile().await.unwrap();
    assert_eq!(
        deleted_pods(&h),
        ["vol-brick-2", "vol-brick-1", "vol-brick-0"]
    );

    h.run_statefulset_controller();
    h.reconcile().await.unwrap();
    assert_eq!(deleted_pods(&h).len(), 3);
    assert_eq!(h.status()["phase"], "Ready");
    assert_eq!(h.condition("Progressing")["status"], "False");
    // The volfile does not change for an image update.
    assert_eq!(current_volfile(&h.api).unwrap().generation, 1);
}

fn volfile_text(h: &Harness) -> String {
    h.api.get(CM_PATH).unwrap()["data"]["volfile.yaml"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn ping_timeout_reaches_the_volfile_and_a_change_bumps_its_generation() {
    let h = Harness::ready_cluster(SharedStorageClusterSpec {
        ping_timeout_seconds: 2,
        ..spec(3)
    })
    .await;
    let text = volfile_text(&h);
    assert!(text.contains("\nping-timeout: 2\n"), "{text}");
    assert_eq!(current_volfile(&h.api).unwrap().generation, 1);
    h.reconcile().await.unwrap();
    assert_eq!(
        current_volfile(&h.api).unwrap().generation,
        1,
        "no change, no bump"
    );

    // Clients follow the volfile: a new timeout is a new generation, bricks unchanged.
    h.edit(|s| s.ping_timeout_seconds = 7);
    h.reconcile().await.unwrap();
    let volfile = current_volfile(&h.api).unwrap();
    assert_eq!(volfile.generation, 2);
    assert_eq!(volfile.ping_timeout, Some(7));
    assert_eq!(volfile_bricks(&h), ["b0", "b1", "b2"]);
    assert!(volfile_text(&h).contains("\nping-timeout: 7\n"));
    assert_eq!(h.status()["volfileGeneration"], 2);
    h.reconcile().await.unwrap();
    assert_eq!(current_volfile(&h.api).unwrap().generation, 2);

    // A volfile written before the key existed (an older operator) is rewritten once, with
    // the timeout and the next generation.
    let mut cm = h.api.get(CM_PATH).unwrap();
    let old = volfile_text(&h).replace("ping-timeout: 7\n", "");
    assert!(!old.contains("ping-timeout"), "{old}");
    cm["data"]["volfile.yaml"] = json!(old);
    h.api.put(CM_PATH, cm);
    h.reconcile().await.unwrap();
    let volfile = current_volfile(&h.api).unwrap();
    assert_eq!(volfile.generation, 3);
    assert_eq!(volfile.ping_timeout, Some(7));
    h.reconcile().await.unwrap();
    assert_eq!(current_volfile(&h.api).unwrap().generation, 3);
}

async fn delete_cluster(h: &Harness) {
    let mut obj = h.api.get(SSC_PATH).unwrap();
    obj["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    h.api.put(SSC_PATH, obj);
    h.api.clear_calls();
    h.reconcile().await.unwrap();
}

#[tokio::test]
async fn deletion_with_retain_keeps_claims_and_releases_finalizer() {
    let h = Harness::ready_cluster(spec(3)).await;
    assert_eq!(h.claim_names().len(), 3);
    delete_cluster(&h).await;
    assert!(deleted_claims(&h).is_empty());
    assert_eq!(h.claim_names().len(), 3);
    assert_eq!(
        h.cluster().metadata.finalizers.unwrap_or_default(),
        Vec::<String>::new()
    );
}

#[tokio::test]
async fn deletion_with_delete_removes_claims_then_releases_finalizer() {
    let h = Harness::ready_cluster(SharedStorageClusterSpec {
        reclaim_policy: ReclaimPolicy::Delete,
        ..spec(3)
    })
    .await;
    // A claim of another cluster in the same namespace is not ours to delete.
    h.api.put(
        &format!("{PVCS_PATH}/data-other-brick-0"),
        json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "data-other-brick-0", "namespace": NS,
            "labels": {"app.kubernetes.io/name": "mortar", "app.kubernetes.io/instance": "other", "app.kubernetes.io/component": "brick"}}}),
    );
    delete_cluster(&h).await;
    let mut deleted = deleted_claims(&h);
    deleted.sort();
    assert_eq!(
        deleted,
        ["data-vol-brick-0", "data-vol-brick-1", "data-vol-brick-2"]
    );
    assert_eq!(h.claim_names(), ["data-other-brick-0"]);
    assert_eq!(
        h.cluster().metadata.finalizers.unwrap_or_default(),
        Vec::<String>::new()
    );
}

#[tokio::test]
async fn invalid_spec_becomes_a_condition_and_touches_nothing() {
    let h = Harness::new(SharedStorageClusterSpec {
        storage: mortar_operator::crd::StorageSpec {
            size: k8s_openapi::apimachinery::pkg::api::resource::Quantity("0".into()),
            storage_class_name: None,
        },
        resources: Some(k8s_openapi::api::core::v1::ResourceRequirements {
            requests: Some(
                [(
                    "memory".to_string(),
                    k8s_openapi::apimachinery::pkg::api::resource::Quantity("2Gi".into()),
                )]
                .into(),
            ),
            limits: Some(
                [(
                    "memory".to_string(),
                    k8s_openapi::apimachinery::pkg::api::resource::Quantity("1Gi".into()),
                )]
                .into(),
            ),
            ..Default::default()
        }),
        ..spec(3)
    });
    h.reconcile().await.unwrap();
    let action = h.reconcile().await.unwrap();
    assert_eq!(action, kube::runtime::controller::Action::await_change());
    assert!(h.api.get(STS_PATH).is_none());
    assert!(h.api.get(CM_PATH).is_none());
    let status = h.status();
    assert_eq!(status["phase"], "Failed");
    let progressing = h.condition("Progressing");
    assert_eq!(progressing["status"], "False");
    assert_eq!(progressing["reason"], "InvalidSpec");
    let message = progressing["message"].as_str().unwrap();
    assert!(message.contains("storage.size"), "{message}");
    assert!(
        message.contains("resources.requests.memory (2Gi) exceeds its limit (1Gi)"),
        "{message}"
    );
    let events = h.calls_matching(Method::POST, "/apis/events.k8s.io/v1/namespaces/ns/events");
    assert_eq!(events.last().unwrap().body["type"], "Warning");

    // Fixing the spec clears the failure.
    h.edit(|s| {
        s.storage.size = k8s_openapi::apimachinery::pkg::api::resource::Quantity("1Gi".into());
        s.resources = None;
    });
    h.reconcile().await.unwrap();
    assert!(h.api.get(STS_PATH).is_some());
    assert_eq!(h.condition("Progressing")["reason"], "Creating");
    assert_ne!(h.status()["phase"], "Failed");
}

#[tokio::test]
async fn too_long_name_is_reported() {
    let h = Harness::new(spec(3));
    let mut obj: Value = h.api.get(SSC_PATH).unwrap();
    obj["metadata"]["name"] = json!("a".repeat(50));
    h.api.put(SSC_PATH, obj);
    // The harness reads the cluster at SSC_PATH whatever its name; the operator addresses it
    // by name, so put it where that name leads too.
    let long_path = format!(
        "/apis/mortar.dev/v1alpha1/namespaces/ns/sharedstorageclusters/{}",
        "a".repeat(50)
    );
    h.api.put(&long_path, h.api.get(SSC_PATH).unwrap());
    let ssc = h.cluster();
    mortar_operator::controller::reconcile(std::sync::Arc::new(ssc), h.ctx.clone())
        .await
        .unwrap();
    let ssc: mortar_operator::crd::SharedStorageCluster =
        serde_json::from_value(h.api.get(&long_path).unwrap()).unwrap();
    mortar_operator::controller::reconcile(std::sync::Arc::new(ssc), h.ctx.clone())
        .await
        .unwrap();
    let status = &h.api.get(&long_path).unwrap()["status"];
    assert_eq!(status["phase"], "Failed");
    assert!(
        status["conditions"].to_string().contains("characters long"),
        "{status}"
    );
}

#[tokio::test]
async fn api_server_refusal_of_built_objects_becomes_a_condition() {
    let h = Harness::new(spec(3));
    h.reconcile().await.unwrap();
    h.api.reject(Method::PATCH, "/statefulsets/vol-brick", 422, "StatefulSet.apps \"vol-brick\" is invalid: spec.template.spec.nodeSelector: Invalid value: \"-bad-\"");
    let action = h.reconcile().await.unwrap();
    assert_eq!(action, kube::runtime::controller::Action::await_change());
    assert_eq!(h.status()["phase"], "Failed");
    assert!(
        h.condition("Progressing")["message"]
            .as_str()
            .unwrap()
            .contains("nodeSelector")
    );
}

#[tokio::test]
async fn api_errors_are_retried_with_growing_backoff() {
    let h = Harness::ready_cluster(spec(3)).await;
    h.api
        .reject(Method::GET, "/configmaps/vol-volfile", 500, "etcd is down");
    let err = h.reconcile().await.unwrap_err();
    let ssc = std::sync::Arc::new(h.cluster());
    let first = mortar_operator::controller::error_policy(ssc.clone(), &err, h.ctx.clone());
    let second = mortar_operator::controller::error_policy(ssc.clone(), &err, h.ctx.clone());
    assert_eq!(
        first,
        kube::runtime::controller::Action::requeue(std::time::Duration::from_secs(2))
    );
    assert_eq!(
        second,
        kube::runtime::controller::Action::requeue(std::time::Duration::from_secs(4))
    );
    let rendered = h.ctx.metrics.render();
    assert!(
        rendered.contains("mortar_operator_reconcile_errors_total{error=\"kube\"} 1"),
        "{rendered}"
    );
}

#[tokio::test]
async fn removed_owned_object_is_recreated() {
    let h = Harness::ready_cluster(spec(3)).await;
    h.api.remove("/api/v1/namespaces/ns/services/vol");
    h.api.remove(CM_PATH);
    h.reconcile().await.unwrap();
    assert!(h.api.get("/api/v1/namespaces/ns/services/vol").is_some());
    // The generation never goes backwards, even when the ConfigMap was lost: bricks ignore
    // older volfiles.
    assert_eq!(current_volfile(&h.api).unwrap().generation, 2);
    assert_eq!(applied(&h, CM_PATH).len(), 1);
}

/// Every call the operator made in a full life cycle appears in API-CALLS.md, which the Helm
/// chart's RBAC follows: an undocumented call would be refused in a real cluster.
#[tokio::test]
async fn every_api_call_is_documented() {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/API-CALLS.md")).unwrap();
    let mut documented = std::collections::BTreeSet::new();
    for line in doc.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let resource = cells[2].trim_matches('`').to_string();
        for verb in cells[3]
            .split(|c: char| !c.is_ascii_alphabetic())
            .filter(|v| !v.is_empty())
        {
            documented.insert((verb.to_string(), resource.clone()));
        }
    }

    let h = Harness::ready_cluster(SharedStorageClusterSpec {
        reclaim_policy: ReclaimPolicy::Delete,
        ..spec(3)
    })
    .await;
    let mut calls = Vec::new();
    let mut take = |h: &Harness| {
        calls.extend(h.api.calls());
        h.api.clear_calls();
    };
    h.edit(|s| s.bricks = 4);
    h.reconcile().await.unwrap();
    h.run_statefulset_controller();
    h.bricks.all_up(4);
    h.reconcile().await.unwrap();
    take(&h);
    h.edit(|s| s.bricks = 3);
    h.reconcile().await.unwrap();
    h.run_statefulset_controller();
    h.reconcile().await.unwrap();
    take(&h);
    h.edit(|s| s.image = Some("mortar:next".into()));
    h.reconcile().await.unwrap();
    h.run_statefulset_controller();
    h.reconcile().await.unwrap();
    h.bricks.unreachable(1);
    h.reconcile().await.unwrap();
    h.bricks.set(1, true, 0);
    h.reconcile().await.unwrap();
    h.reconcile().await.unwrap();
    take(&h);
    delete_cluster(&h).await;
    take(&h);

    let mut seen = std::collections::BTreeSet::new();
    for call in &calls {
        let idx = call.path.find("/namespaces/").unwrap();
        let rest: Vec<&str> = call.path[idx + "/namespaces/".len()..].split('/').collect();
        let resource = match rest.len() {
            2 | 3 => rest[1].to_string(),
            4 => format!("{}/{}", rest[1], rest[3]),
            _ => panic!("{}", call.path),
        };
        let verb = match (call.method.as_str(), rest.len()) {
            ("GET", 2) => "list",
            ("GET", _) => "get",
            ("PATCH", _) => "patch",
            ("POST", _) => "create",
            ("DELETE", _) => "delete",
            (m, _) => panic!("unexpected method {m}"),
        };
        seen.insert((verb.to_string(), resource));
    }
    for call in &seen {
        assert!(documented.contains(call), "{call:?} is not in API-CALLS.md");
    }
    // The life cycle above exercises every kind of write the operator makes.
    for expected in [
        ("patch", "sharedstorageclusters/status"),
        ("patch", "statefulsets"),
        ("delete", "pods"),
        ("delete", "persistentvolumeclaims"),
        ("create", "events"),
    ] {
        assert!(
            seen.contains(&(expected.0.to_string(), expected.1.to_string())),
            "{expected:?} not exercised"
        );
    }
}
