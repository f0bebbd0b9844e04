//! Leader election against the fake API server: the Lease is created, taken and released.

mod support;

use std::sync::Arc;
use std::time::Duration;

use mortar_operator::leader::{Leadership, LeaseConfig};
use support::{FakeApi, fake_client};

const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/ns/leases/mortar-operator-leader";

fn config(identity: &str) -> LeaseConfig {
    LeaseConfig {
        namespace: "ns".into(),
        name: "mortar-operator-leader".into(),
        identity: identity.into(),
    }
}

#[tokio::test]
async fn first_replica_takes_the_lease_and_releases_it() {
    let api = Arc::new(FakeApi::default());
    let mut leadership = Leadership::join(fake_client(api.clone()), &config("replica-a"))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), leadership.acquired())
        .await
        .unwrap()
        .unwrap();
    assert!(leadership.is_leader());
    let lease = api.get(LEASE).expect("lease created");
    assert_eq!(lease["spec"]["holderIdentity"], "replica-a");
    assert_eq!(lease["spec"]["leaseDurationSeconds"], 15);

    leadership.release().await;
    let lease = api.get(LEASE).unwrap();
    assert!(lease["spec"]["holderIdentity"].is_null(), "{lease}");
}

#[tokio::test]
async fn second_replica_waits_while_the_lease_is_held() {
    let api = Arc::new(FakeApi::default());
    let mut a = Leadership::join(fake_client(api.clone()), &config("replica-a"))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), a.acquired())
        .await
        .unwrap()
        .unwrap();

    let mut b = Leadership::join(fake_client(api.clone()), &config("replica-b"))
        .await
        .unwrap();
    let waited = tokio::time::timeout(Duration::from_secs(2), b.acquired()).await;
    assert!(
        waited.is_err(),
        "replica-b must not lead while replica-a holds a fresh lease"
    );
    assert!(!b.is_leader());
    assert_eq!(
        api.get(LEASE).unwrap()["spec"]["holderIdentity"],
        "replica-a"
    );

    // Once a lets go, b takes over.
    a.release().await;
    tokio::time::timeout(Duration::from_secs(20), b.acquired())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        api.get(LEASE).unwrap()["spec"]["holderIdentity"],
        "replica-b"
    );
}
