//! The controller on the Mortar client-library backend against three real `mortar-brick`
//! processes on 127.61.0.x: PVC directories appear (and disappear) on every brick.
//!
//! Needs the brick binary next to the test's target dir:
//! `CARGO_TARGET_DIR=/work/target-csi cargo build --bins -p mortar-brick -p mortar-client`.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use mortar_common::gfid::Gfid;
use mortar_csi::csi::*;
use mortar_csi::mortar_ops::{MortarOps, MortarResolver};
use mortar_csi::ops::VolumeOps;
use mortar_csi::server::Mode;
use mortar_csi::volume_id::VolumeId;
use mortar_e2e::Cluster;
use tonic::Code;

const NET: u8 = 61;

fn on_every_brick(cluster: &Cluster, rel: &str) -> Vec<bool> {
    (0..3)
        .map(|i| cluster.brick_dir(i).join(rel).exists())
        .collect()
}

fn brick_entries(cluster: &Cluster, i: usize) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(cluster.brick_dir(i))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != ".mortar")
        .collect();
    v.sort();
    v
}

async fn list_all(c: &mut Clients, page: i32) -> Vec<(String, i64)> {
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let r = c
            .controller
            .list_volumes(ListVolumesRequest {
                max_entries: page,
                starting_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.entries.len() <= page as usize);
        for e in r.entries {
            let v = e.volume.unwrap();
            out.push((v.volume_id, v.capacity_bytes));
        }
        if r.next_token.is_empty() {
            return out;
        }
        token = r.next_token;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_provisions_on_real_bricks() {
    let cluster = tokio::task::spawn_blocking(|| Cluster::start(NET, 3))
        .await
        .unwrap();

    // The backend itself first: every VolumeOps property, on an empty volume.
    let vol = cluster.volume().await;
    let ops = MortarOps::new(vol.clone());
    mortar_csi::ops_conformance::check(&ops).await;

    // The controller over its unix socket. The template resolves the cluster named by the
    // StorageClass (`storage/shared`) to the first brick, as `{cluster}.{namespace}.svc:24100`
    // resolves to the operator's client Service in Kubernetes.
    let layout = Layout::new("mortar-backend");
    let known: VolumeId = format!("{NAMESPACE}/{CLUSTER}/data").parse().unwrap();
    let resolver = MortarResolver::new(cluster.addr(0), vec![known.location])
        .with_ping_timeout(Duration::from_secs(2));
    let (server, mut c) =
        InProcess::start_with(&layout, Mode::Controller, None, Arc::new(resolver)).await;

    let probe = c
        .identity
        .probe(ProbeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(probe.ready, Some(true));

    // CreateVolume: a pvc- directory with the size limit, on all three bricks.
    let create = |name: &str, bytes: i64| create_req(name, bytes);
    let v = c
        .controller
        .create_volume(create("pvc-0001", 10 * MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(v.volume_id, format!("{NAMESPACE}/{CLUSTER}/data/pvc-0001"));
    assert_eq!(v.capacity_bytes, 10 * MIB);
    assert_eq!(on_every_brick(&cluster, "pvc-0001"), vec![true; 3]);
    for i in 0..3 {
        assert_eq!(
            brick_entries(&cluster, i),
            vec!["pvc-0001"],
            "brick {i}: no scratch directory left behind"
        );
        let mode = std::fs::metadata(cluster.brick_dir(i).join("pvc-0001"))
            .unwrap()
            .permissions();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.mode() & 0o7777, 0o777, "brick {i}");
    }
    let meta = ops.get_meta("pvc-0001").await.unwrap().unwrap();
    assert_eq!(meta.limit_bytes, 10 << 20);

    // Idempotent; an incompatible size is AlreadyExists.
    let again = c
        .controller
        .create_volume(create("pvc-0001", 10 * MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(again.volume_id, v.volume_id);
    assert_code(
        c.controller
            .create_volume(create("pvc-0001", 20 * MIB))
            .await,
        Code::AlreadyExists,
        "same name, bigger size",
    );

    // Content written through the library, then a clone copies it (read/write through
    // the library) with modes, owners and symlinks.
    let dir = Gfid::from_bytes(&vol.lookup(Gfid::ROOT, b"pvc-0001").await.unwrap().gfid).unwrap();
    let sub = vol
        .create(
            dir,
            b"sub",
            2i32.try_into().unwrap(),
            0o750,
            1000,
            1000,
            0,
            b"",
        )
        .await
        .unwrap();
    let sub = Gfid::from_bytes(&sub.gfid).unwrap();
    let file = vol
        .create(
            sub,
            b"file",
            1i32.try_into().unwrap(),
            0o640,
            1000,
            1000,
            0,
            b"",
        )
        .await
        .unwrap();
    let file = Gfid::from_bytes(&file.gfid).unwrap();
    // More than one copy chunk, not a multiple of it.
    let content = mortar_e2e::pattern(7, (1 << 20) + 12345);
    vol.write(file, 0, content.clone(), false).await.unwrap();

    // The size limit is a real quota: the core counts usage and refuses writes past it.
    let (limit, used) = vol.quota(dir).await.unwrap().expect("quota set");
    assert_eq!((limit, used), (10 << 20, content.len() as u64));
    let big = vol
        .create(dir, b"big", 1i32.try_into().unwrap(), 0o644, 0, 0, 0, b"")
        .await
        .unwrap();
    let big = Gfid::from_bytes(&big.gfid).unwrap();
    let err = vol
        .write(big, 0, vec![1u8; 10 << 20], false)
        .await
        .expect_err("a write past the PVC's size");
    assert_eq!(err.errno(), libc::EDQUOT, "{err}");
    vol.remove(dir, b"big", false).await.unwrap();
    vol.create(
        dir,
        b"link",
        3i32.try_into().unwrap(),
        0o777,
        0,
        0,
        0,
        b"sub/file",
    )
    .await
    .unwrap();

    let mut clone = create("pvc-0002", 10 * MIB);
    clone.volume_content_source = Some(VolumeContentSource {
        r#type: Some(volume_content_source::Type::Volume(
            volume_content_source::VolumeSource {
                volume_id: v.volume_id.clone(),
            },
        )),
    });
    let cloned = c
        .controller
        .create_volume(clone.clone())
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(
        cloned.volume_id,
        format!("{NAMESPACE}/{CLUSTER}/data/pvc-0002")
    );
    for i in 0..3 {
        let b = cluster.brick_dir(i);
        assert_eq!(
            std::fs::read(b.join("pvc-0002/sub/file")).unwrap(),
            content,
            "brick {i}: cloned data"
        );
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(b.join("pvc-0002/sub/file")).unwrap();
        assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o640, 1000, 1000));
        let m = std::fs::metadata(b.join("pvc-0002/sub")).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o750);
        assert_eq!(
            std::fs::read_link(b.join("pvc-0002/link")).unwrap(),
            Path::new("sub/file")
        );
    }
    // Repeated clone request: same answer.
    c.controller.create_volume(clone).await.unwrap();

    // Usage through the library counts the tree.
    let usage = ops.usage("pvc-0002").await.unwrap();
    assert_eq!(usage.bytes, content.len() as u64);
    assert_eq!(usage.inodes, 3);

    // An archiving StorageClass.
    let mut archived = create("pvc-0003", 5 * MIB);
    archived
        .parameters
        .insert("reclaim".into(), "archive".into());
    let archived = c
        .controller
        .create_volume(archived)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();

    // ListVolumes, paged one by one.
    let listed = list_all(&mut c, 1).await;
    assert_eq!(
        listed,
        vec![
            (v.volume_id.clone(), 10 * MIB),
            (cloned.volume_id.clone(), 10 * MIB),
            (archived.volume_id.clone(), 5 * MIB),
        ]
    );

    // Expand: the new limit is recorded on the volume.
    let r = c
        .controller
        .controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: v.volume_id.clone(),
            capacity_range: Some(CapacityRange {
                required_bytes: 30 * MIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.capacity_bytes, 30 * MIB);
    assert!(!r.node_expansion_required);
    assert_eq!(
        ops.get_meta("pvc-0001").await.unwrap().unwrap().limit_bytes,
        30 << 20
    );
    assert_eq!(
        list_all(&mut c, 10).await[0],
        (v.volume_id.clone(), 30 * MIB)
    );

    let cap = c
        .controller
        .get_capacity(GetCapacityRequest {
            parameters: cluster_params(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(cap.available_capacity > 0);

    // Delete: recursive through the library, gone from every brick; idempotent.
    for id in [&v.volume_id, &cloned.volume_id] {
        for _ in 0..2 {
            c.controller
                .delete_volume(DeleteVolumeRequest {
                    volume_id: id.clone(),
                    ..Default::default()
                })
                .await
                .unwrap();
        }
    }
    assert_eq!(on_every_brick(&cluster, "pvc-0001"), vec![false; 3]);
    assert_eq!(on_every_brick(&cluster, "pvc-0002"), vec![false; 3]);
    // Archive: renamed, data kept, on every brick.
    c.controller
        .delete_volume(DeleteVolumeRequest {
            volume_id: archived.volume_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    for i in 0..3 {
        let names = brick_entries(&cluster, i);
        assert_eq!(names.len(), 1, "brick {i}: {names:?}");
        assert!(
            names[0].starts_with("archived-pvc-0003-"),
            "brick {i}: {names:?}"
        );
    }
    assert!(list_all(&mut c, 10).await.is_empty());

    // Expanding a deleted volume: NotFound.
    assert_code(
        c.controller
            .controller_expand_volume(ControllerExpandVolumeRequest {
                volume_id: v.volume_id.clone(),
                capacity_range: Some(CapacityRange {
                    required_bytes: 40 * MIB,
                    limit_bytes: 0,
                }),
                ..Default::default()
            })
            .await,
        Code::NotFound,
        "expand a deleted volume",
    );

    server.stop().await;
    vol.shutdown().await;
    drop(cluster);
}

#[tokio::test]
async fn unreachable_cluster_is_unavailable() {
    // Nothing listens on 127.61.1.1: CreateVolume must say Unavailable (retry), not
    // NotFound or success.
    let layout = Layout::new("mortar-unreachable");
    let resolver =
        MortarResolver::new("127.61.1.1:24100", vec![]).with_ping_timeout(Duration::from_secs(1));
    let (server, mut c) =
        InProcess::start_with(&layout, Mode::Controller, None, Arc::new(resolver)).await;
    assert_code(
        c.controller.create_volume(create_req("pvc-x", MIB)).await,
        Code::Unavailable,
        "create on an unreachable cluster",
    );
    server.stop().await;
}
