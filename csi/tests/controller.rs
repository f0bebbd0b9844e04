//! Controller and identity services driven over their unix socket, in the order the
//! external-provisioner / resizer sidecars call them, against the local-directory
//! volume backend.

mod common;

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;

use common::*;
use mortar_csi::csi::controller_service_capability::rpc::Type as CtrlCap;
use mortar_csi::csi::volume_capability::access_mode::Mode as AccessMode;
use mortar_csi::csi::*;
use mortar_csi::ops::{LIMIT_XATTR, get_xattr};
use mortar_csi::server::Mode;
use tonic::Code;

async fn start(tag: &str) -> (Layout, InProcess, Clients) {
    let layout = Layout::new(tag);
    let (server, clients) = InProcess::start(&layout, Mode::Controller, None).await;
    (layout, server, clients)
}

fn limit_of(path: &std::path::Path) -> u64 {
    get_xattr(path, LIMIT_XATTR)
        .unwrap()
        .expect("size limit recorded")
        .parse()
        .unwrap()
}

#[tokio::test]
async fn identity_reports_driver_and_readiness() {
    let (_layout, server, mut c) = start("identity").await;
    let info = c
        .identity
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "mortar.csi.mortar.dev");
    assert!(!info.vendor_version.is_empty());
    let caps = c
        .identity
        .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    use plugin_capability::Type as T;
    assert!(caps.capabilities.iter().any(|c| matches!(&c.r#type,
        Some(T::Service(s)) if s.r#type == plugin_capability::service::Type::ControllerService as i32)));
    assert!(caps.capabilities.iter().any(|c| matches!(&c.r#type,
        Some(T::VolumeExpansion(e)) if e.r#type == plugin_capability::volume_expansion::Type::Online as i32)));
    let probe = c
        .identity
        .probe(ProbeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(probe.ready, Some(true));

    let got: HashSet<i32> = c
        .controller
        .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities
        .into_iter()
        .filter_map(|c| {
            c.r#type
                .map(|controller_service_capability::Type::Rpc(r)| r.r#type)
        })
        .collect();
    for want in [
        CtrlCap::CreateDeleteVolume,
        CtrlCap::ListVolumes,
        CtrlCap::GetCapacity,
        CtrlCap::CloneVolume,
        CtrlCap::ExpandVolume,
        CtrlCap::SingleNodeMultiWriter,
    ] {
        assert!(got.contains(&(want as i32)), "missing {want:?}");
    }
    // No attach step for a network file system.
    assert!(!got.contains(&(CtrlCap::PublishUnpublishVolume as i32)));
    server.stop().await;
}

#[tokio::test]
async fn provision_validate_expand_delete_in_sidecar_order() {
    let (layout, server, mut c) = start("lifecycle").await;
    let name = "pvc-6f1c1bde-0000-4000-8000-00000000000a";

    let vol = c
        .controller
        .create_volume(create_req(name, 10 * MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(vol.volume_id, format!("{NAMESPACE}/{CLUSTER}/data/{name}"));
    assert_eq!(vol.capacity_bytes, 10 * MIB);
    assert_eq!(
        vol.volume_context.get("cluster").map(String::as_str),
        Some(CLUSTER)
    );
    assert_eq!(
        vol.volume_context
            .get("clusterNamespace")
            .map(String::as_str),
        Some(NAMESPACE)
    );
    assert_eq!(
        vol.volume_context.get("subdir").map(String::as_str),
        Some(name)
    );
    let dir = layout.data().join(name);
    assert!(dir.is_dir(), "PVC directory made on the volume");
    assert_eq!(limit_of(&dir), 10 * MIB as u64);
    assert_eq!(
        std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
        0o777,
        "writable by any pod user"
    );
    // Nothing half-made is left at the volume root.
    let names: Vec<String> = std::fs::read_dir(layout.data())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, vec![name.to_string()]);

    // Idempotent: the provisioner retries after timeouts.
    let again = c
        .controller
        .create_volume(create_req(name, 10 * MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(again.volume_id, vol.volume_id);
    assert_eq!(again.capacity_bytes, 10 * MIB);
    // A smaller request is satisfied by the existing volume.
    let smaller = c
        .controller
        .create_volume(create_req(name, 5 * MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(smaller.capacity_bytes, 10 * MIB);
    // Same name, incompatible size.
    assert_code(
        c.controller.create_volume(create_req(name, 20 * MIB)).await,
        Code::AlreadyExists,
        "bigger",
    );
    let mut capped = create_req(name, MIB);
    capped.capacity_range.as_mut().unwrap().limit_bytes = 5 * MIB;
    assert_code(
        c.controller.create_volume(capped).await,
        Code::AlreadyExists,
        "limit below existing size",
    );

    // ValidateVolumeCapabilities confirms every access mode of a mount volume...
    for mode in [
        AccessMode::SingleNodeWriter,
        AccessMode::SingleNodeReaderOnly,
        AccessMode::MultiNodeReaderOnly,
        AccessMode::MultiNodeSingleWriter,
        AccessMode::MultiNodeMultiWriter,
        AccessMode::SingleNodeSingleWriter,
        AccessMode::SingleNodeMultiWriter,
    ] {
        let r = c
            .controller
            .validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
                volume_id: vol.volume_id.clone(),
                volume_capabilities: vec![mount_cap(mode)],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let confirmed = r
            .confirmed
            .unwrap_or_else(|| panic!("{mode:?} not confirmed: {}", r.message));
        assert_eq!(confirmed.volume_capabilities, vec![mount_cap(mode)]);
    }
    // ...and refuses block access without failing the call.
    let r = c
        .controller
        .validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
            volume_id: vol.volume_id.clone(),
            volume_capabilities: vec![mount_cap(AccessMode::SingleNodeWriter), block_cap()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.confirmed.is_none());
    assert!(r.message.contains("block"), "{}", r.message);

    // Expansion raises the limit in place (online: no node step).
    std::fs::write(dir.join("file"), vec![7u8; 4096]).unwrap();
    let expand = |bytes: i64| ControllerExpandVolumeRequest {
        volume_id: vol.volume_id.clone(),
        capacity_range: Some(CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        ..Default::default()
    };
    let r = c
        .controller
        .controller_expand_volume(expand(20 * MIB))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.capacity_bytes, 20 * MIB);
    assert!(!r.node_expansion_required);
    assert_eq!(limit_of(&dir), 20 * MIB as u64);
    assert_eq!(
        std::fs::read(dir.join("file")).unwrap().len(),
        4096,
        "data kept"
    );
    let r = c
        .controller
        .controller_expand_volume(expand(20 * MIB))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.capacity_bytes, 20 * MIB, "repeat is idempotent");
    let r = c
        .controller
        .controller_expand_volume(expand(5 * MIB))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.capacity_bytes, 20 * MIB, "never shrinks");
    assert_eq!(limit_of(&dir), 20 * MIB as u64);
    // The new size is what a repeated CreateVolume now sees.
    let after = c
        .controller
        .create_volume(create_req(name, 10 * MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(after.capacity_bytes, 20 * MIB);

    c.controller
        .delete_volume(DeleteVolumeRequest {
            volume_id: vol.volume_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(!dir.exists(), "deleted with its data");
    c.controller
        .delete_volume(DeleteVolumeRequest {
            volume_id: vol.volume_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_code(
        c.controller
            .validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
                volume_id: vol.volume_id.clone(),
                volume_capabilities: vec![mount_cap(AccessMode::SingleNodeWriter)],
                ..Default::default()
            })
            .await,
        Code::NotFound,
        "validate after delete",
    );
    server.stop().await;
}

#[tokio::test]
async fn names_that_are_not_pvc_names_still_map_to_one_directory() {
    let (layout, server, mut c) = start("names").await;
    let a = c
        .controller
        .create_volume(create_req("sanity/Volume One", MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let b = c
        .controller
        .create_volume(create_req("sanity/Volume One", MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let other = c
        .controller
        .create_volume(create_req("sanity/Volume Two", MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(a.volume_id, b.volume_id);
    assert_ne!(a.volume_id, other.volume_id);
    let dir = a.volume_id.rsplit('/').next().unwrap();
    assert!(dir.starts_with("pvc-"));
    assert!(layout.data().join(dir).is_dir());
    server.stop().await;
}

#[tokio::test]
async fn list_volumes_pages_through_every_volume() {
    let (layout, server, mut c) = start("list").await;
    // Volumes on two Mortar volumes: the named cluster and one given by volfile servers.
    std::fs::create_dir_all(
        layout
            .volumes
            .join("@servers")
            .join("10.0.0.1:24100,10.0.0.2")
            .join("data"),
    )
    .unwrap();
    let mut made = HashSet::new();
    for i in 0..4 {
        let v = c
            .controller
            .create_volume(create_req(&format!("pvc-list-{i}"), MIB))
            .await
            .unwrap()
            .into_inner();
        made.insert(v.volume.unwrap().volume_id);
    }
    for i in 0..3 {
        let mut req = create_req(&format!("pvc-srv-{i}"), MIB);
        req.parameters = [(
            "volfileServers".to_string(),
            "10.0.0.1:24100,10.0.0.2".to_string(),
        )]
        .into();
        let v = c
            .controller
            .create_volume(req)
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        assert!(
            v.volume_id
                .starts_with("@10.0.0.1:24100,10.0.0.2/data/pvc-srv-"),
            "{}",
            v.volume_id
        );
        made.insert(v.volume_id);
    }
    // Foreign and archived directories at the volume root are not volumes.
    std::fs::create_dir(layout.data().join("lost+found")).unwrap();
    std::fs::create_dir(layout.data().join("archived-pvc-old-1")).unwrap();

    let all = c
        .controller
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(all.next_token.is_empty());
    let ids: HashSet<String> = all
        .entries
        .iter()
        .map(|e| e.volume.as_ref().unwrap().volume_id.clone())
        .collect();
    assert_eq!(ids, made);
    assert!(
        all.entries
            .iter()
            .all(|e| e.volume.as_ref().unwrap().capacity_bytes == MIB)
    );

    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = c
            .controller
            .list_volumes(ListVolumesRequest {
                max_entries: 2,
                starting_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.entries.len() <= 2);
        seen.extend(
            page.entries
                .into_iter()
                .map(|e| e.volume.unwrap().volume_id),
        );
        pages += 1;
        if pages == 2 {
            // A volume deleted between pages must not make the listing skip others.
            let victim = seen[0].clone();
            c.controller
                .delete_volume(DeleteVolumeRequest {
                    volume_id: victim,
                    ..Default::default()
                })
                .await
                .unwrap();
        }
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    assert_eq!(pages, 4, "7 volumes in pages of 2");
    assert_eq!(seen.len(), 7);
    assert_eq!(
        seen.iter().collect::<HashSet<_>>().len(),
        7,
        "no duplicates"
    );
    assert_eq!(seen.into_iter().collect::<HashSet<_>>(), made);

    assert_code(
        c.controller
            .list_volumes(ListVolumesRequest {
                max_entries: 1,
                starting_token: "not a token".into(),
            })
            .await,
        Code::Aborted,
        "bad token",
    );
    assert_code(
        c.controller
            .list_volumes(ListVolumesRequest {
                max_entries: -1,
                starting_token: String::new(),
            })
            .await,
        Code::InvalidArgument,
        "negative max_entries",
    );
    server.stop().await;
}

#[tokio::test]
async fn archive_reclaim_keeps_the_data_under_a_new_name() {
    let (layout, server, mut c) = start("archive").await;
    let mut req = create_req("pvc-keep", MIB);
    req.parameters.insert("reclaim".into(), "archive".into());
    let vol = c
        .controller
        .create_volume(req)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    std::fs::write(layout.data().join("pvc-keep").join("precious"), b"data").unwrap();

    c.controller
        .delete_volume(DeleteVolumeRequest {
            volume_id: vol.volume_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(!layout.data().join("pvc-keep").exists());
    let archived: Vec<_> = std::fs::read_dir(layout.data())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("archived-pvc-keep-"))
        .collect();
    assert_eq!(archived.len(), 1, "{archived:?}");
    assert_eq!(
        std::fs::read(layout.data().join(&archived[0]).join("precious")).unwrap(),
        b"data"
    );
    c.controller
        .delete_volume(DeleteVolumeRequest {
            volume_id: vol.volume_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let list = c
        .controller
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        list.entries.is_empty(),
        "archived data is not a volume any more"
    );

    // The same name can be provisioned again afresh.
    let again = c
        .controller
        .create_volume(create_req("pvc-keep", MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(again.volume_id, vol.volume_id);
    assert!(!layout.data().join("pvc-keep").join("precious").exists());
    server.stop().await;
}

#[tokio::test]
async fn clone_copies_the_source_tree() {
    let (layout, server, mut c) = start("clone").await;
    let src = c
        .controller
        .create_volume(create_req("pvc-src", 2 * MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let s = layout.data().join("pvc-src");
    std::fs::create_dir(s.join("sub")).unwrap();
    std::fs::write(s.join("sub").join("a"), b"alpha").unwrap();
    std::fs::write(s.join("script"), b"#!/bin/sh\n").unwrap();
    std::fs::set_permissions(s.join("script"), std::fs::Permissions::from_mode(0o750)).unwrap();
    std::os::unix::fs::symlink("sub/a", s.join("link")).unwrap();
    std::os::unix::fs::chown(s.join("sub").join("a"), Some(1234), Some(4321)).unwrap();

    let clone_req = |name: &str, source: &str| {
        let mut r = create_req(name, 2 * MIB);
        r.volume_content_source = Some(VolumeContentSource {
            r#type: Some(volume_content_source::Type::Volume(
                volume_content_source::VolumeSource {
                    volume_id: source.into(),
                },
            )),
        });
        r
    };
    let clone = c
        .controller
        .create_volume(clone_req("pvc-dst", &src.volume_id))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert!(clone.content_source.is_some(), "response names its source");
    let d = layout.data().join("pvc-dst");
    assert_eq!(std::fs::read(d.join("sub").join("a")).unwrap(), b"alpha");
    assert_eq!(
        std::fs::read_link(d.join("link")).unwrap(),
        std::path::Path::new("sub/a")
    );
    assert_eq!(
        std::fs::metadata(d.join("script"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o750
    );
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(d.join("sub").join("a")).unwrap();
    assert_eq!((m.uid(), m.gid()), (1234, 4321));
    // Independent copy.
    std::fs::write(d.join("sub").join("a"), b"changed").unwrap();
    assert_eq!(std::fs::read(s.join("sub").join("a")).unwrap(), b"alpha");

    // Idempotent with the same source; the same name without it is a different volume.
    c.controller
        .create_volume(clone_req("pvc-dst", &src.volume_id))
        .await
        .unwrap();
    assert_code(
        c.controller
            .create_volume(create_req("pvc-dst", 2 * MIB))
            .await,
        Code::AlreadyExists,
        "same name, no source",
    );
    assert_code(
        c.controller
            .create_volume(clone_req(
                "pvc-x",
                &format!("{NAMESPACE}/{CLUSTER}/data/pvc-missing"),
            ))
            .await,
        Code::NotFound,
        "missing source",
    );
    assert_code(
        c.controller
            .create_volume(clone_req("pvc-y", "not/an id at all"))
            .await,
        Code::NotFound,
        "garbage source",
    );
    assert_code(
        c.controller
            .create_volume(clone_req("pvc-z", "other/cluster/data/pvc-src"))
            .await,
        Code::InvalidArgument,
        "cross-volume clone",
    );
    assert!(!layout.data().join("pvc-x").exists());
    server.stop().await;
}

#[tokio::test]
async fn capacity_is_bounded_by_the_volume() {
    let (_layout, server, mut c) = start("capacity").await;
    let cap = c
        .controller
        .get_capacity(GetCapacityRequest {
            parameters: cluster_params(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .available_capacity;
    assert!(cap > 0);
    let none = c
        .controller
        .get_capacity(GetCapacityRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        none.available_capacity, 0,
        "no StorageClass, no volume to measure"
    );
    let block = c
        .controller
        .get_capacity(GetCapacityRequest {
            parameters: cluster_params(),
            volume_capabilities: vec![block_cap()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        block.available_capacity, 0,
        "unsupported capability has no capacity"
    );

    let huge = i64::MAX / 2;
    assert_code(
        c.controller
            .create_volume(create_req("pvc-huge", huge))
            .await,
        Code::OutOfRange,
        "bigger than the volume",
    );
    let v = c
        .controller
        .create_volume(create_req("pvc-small", MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_code(
        c.controller
            .controller_expand_volume(ControllerExpandVolumeRequest {
                volume_id: v.volume_id.clone(),
                capacity_range: Some(CapacityRange {
                    required_bytes: huge,
                    limit_bytes: 0,
                }),
                ..Default::default()
            })
            .await,
        Code::OutOfRange,
        "expand beyond the volume",
    );
    assert_code(
        c.controller
            .controller_expand_volume(ControllerExpandVolumeRequest {
                volume_id: v.volume_id.clone(),
                capacity_range: Some(CapacityRange {
                    required_bytes: 0,
                    limit_bytes: MIB / 2,
                }),
                ..Default::default()
            })
            .await,
        Code::OutOfRange,
        "limit below the current size",
    );
    server.stop().await;
}

#[tokio::test]
async fn every_controller_call_validates_its_request() {
    let (layout, server, mut c) = start("ctrl-negative").await;
    let ctl = &mut c.controller;

    // CreateVolume
    let mut r = create_req("", MIB);
    assert_code(
        ctl.create_volume(r.clone()).await,
        Code::InvalidArgument,
        "no name",
    );
    r.name = "pvc-n".into();
    r.volume_capabilities.clear();
    assert_code(
        ctl.create_volume(r).await,
        Code::InvalidArgument,
        "no capabilities",
    );
    let mut r = create_req("pvc-n", MIB);
    r.volume_capabilities = vec![block_cap()];
    assert_code(ctl.create_volume(r).await, Code::InvalidArgument, "block");
    let mut r = create_req("pvc-n", MIB);
    r.volume_capabilities[0].access_mode = None;
    assert_code(
        ctl.create_volume(r).await,
        Code::InvalidArgument,
        "no access mode",
    );
    let mut r = create_req("pvc-n", MIB);
    r.volume_capabilities[0].access_type = None;
    assert_code(
        ctl.create_volume(r).await,
        Code::InvalidArgument,
        "no access type",
    );
    let mut r = create_req("pvc-n", MIB);
    r.volume_capabilities[0].access_mode = Some(volume_capability::AccessMode {
        mode: AccessMode::Unknown as i32,
    });
    assert_code(
        ctl.create_volume(r).await,
        Code::InvalidArgument,
        "UNKNOWN access mode",
    );
    let mut r = create_req("pvc-n", MIB);
    r.volume_capabilities[0].access_type = Some(volume_capability::AccessType::Mount(
        volume_capability::MountVolume {
            fs_type: "ext4".into(),
            ..Default::default()
        },
    ));
    assert_code(ctl.create_volume(r).await, Code::InvalidArgument, "ext4");
    let mut r = create_req("pvc-n", MIB);
    r.parameters.clear();
    assert_code(
        ctl.create_volume(r).await,
        Code::InvalidArgument,
        "no parameters",
    );
    let mut r = create_req("pvc-n", MIB);
    r.parameters.insert("cluster".into(), "nonexistent".into());
    assert_code(
        ctl.create_volume(r).await,
        Code::Unavailable,
        "unknown cluster",
    );
    assert_code(
        ctl.create_volume(create_req("pvc-n", -5)).await,
        Code::InvalidArgument,
        "negative size",
    );
    let mut r = create_req("pvc-n", 2 * MIB);
    r.capacity_range.as_mut().unwrap().limit_bytes = MIB;
    assert_code(
        ctl.create_volume(r).await,
        Code::InvalidArgument,
        "required above limit",
    );
    let mut r = create_req("pvc-n", MIB);
    r.volume_content_source = Some(VolumeContentSource {
        r#type: Some(volume_content_source::Type::Snapshot(
            volume_content_source::SnapshotSource {
                snapshot_id: "s".into(),
            },
        )),
    });
    assert_code(
        ctl.create_volume(r).await,
        Code::InvalidArgument,
        "snapshot source",
    );
    assert!(
        !layout.data().join("pvc-n").exists(),
        "no refused request left anything behind"
    );

    // DeleteVolume
    assert_code(
        ctl.delete_volume(DeleteVolumeRequest::default()).await,
        Code::InvalidArgument,
        "delete without id",
    );
    for id in [
        "garbage",
        "storage/nonexistent/data/pvc-1",
        "storage/shared/data/pvc-never-made",
    ] {
        ctl.delete_volume(DeleteVolumeRequest {
            volume_id: id.into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("deleting unknown {id} must succeed: {e}"));
    }
    // A whole-volume (static) handle never deletes the shared volume.
    std::fs::write(layout.data().join("shared-file"), b"x").unwrap();
    ctl.delete_volume(DeleteVolumeRequest {
        volume_id: format!("{NAMESPACE}/{CLUSTER}/data"),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(layout.data().join("shared-file").exists());

    // ValidateVolumeCapabilities
    let v = |id: &str, caps: Vec<VolumeCapability>| ValidateVolumeCapabilitiesRequest {
        volume_id: id.into(),
        volume_capabilities: caps,
        ..Default::default()
    };
    let good = || vec![mount_cap(AccessMode::SingleNodeWriter)];
    assert_code(
        ctl.validate_volume_capabilities(v("", good())).await,
        Code::InvalidArgument,
        "validate without id",
    );
    let vol = ctl
        .create_volume(create_req("pvc-v", MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_code(
        ctl.validate_volume_capabilities(v(&vol.volume_id, vec![]))
            .await,
        Code::InvalidArgument,
        "validate without caps",
    );
    assert_code(
        ctl.validate_volume_capabilities(v("storage/shared/data/pvc-none", good()))
            .await,
        Code::NotFound,
        "unknown volume",
    );
    assert_code(
        ctl.validate_volume_capabilities(v("storage/nope/data/pvc-v", good()))
            .await,
        Code::NotFound,
        "unknown cluster",
    );
    assert_code(
        ctl.validate_volume_capabilities(v("garbage", good())).await,
        Code::NotFound,
        "garbage id",
    );

    // ControllerExpandVolume
    let e = |id: &str, range: Option<CapacityRange>| ControllerExpandVolumeRequest {
        volume_id: id.into(),
        capacity_range: range,
        ..Default::default()
    };
    let two = Some(CapacityRange {
        required_bytes: 2 * MIB,
        limit_bytes: 0,
    });
    assert_code(
        ctl.controller_expand_volume(e("", two)).await,
        Code::InvalidArgument,
        "expand without id",
    );
    assert_code(
        ctl.controller_expand_volume(e(&vol.volume_id, None)).await,
        Code::InvalidArgument,
        "expand without range",
    );
    assert_code(
        ctl.controller_expand_volume(e(
            &vol.volume_id,
            Some(CapacityRange {
                required_bytes: 0,
                limit_bytes: 0,
            }),
        ))
        .await,
        Code::InvalidArgument,
        "expand to nothing",
    );
    assert_code(
        ctl.controller_expand_volume(e("storage/shared/data/pvc-none", two))
            .await,
        Code::NotFound,
        "expand unknown",
    );
    assert_code(
        ctl.controller_expand_volume(e("garbage", two)).await,
        Code::NotFound,
        "expand garbage",
    );
    assert_code(
        ctl.controller_expand_volume(e("storage/shared/data", two))
            .await,
        Code::FailedPrecondition,
        "expand whole volume",
    );

    // Unsupported calls say so.
    assert_code(
        ctl.controller_publish_volume(ControllerPublishVolumeRequest::default())
            .await,
        Code::Unimplemented,
        "publish",
    );
    assert_code(
        ctl.controller_unpublish_volume(ControllerUnpublishVolumeRequest::default())
            .await,
        Code::Unimplemented,
        "unpublish",
    );
    assert_code(
        ctl.create_snapshot(CreateSnapshotRequest::default()).await,
        Code::Unimplemented,
        "snapshot",
    );
    assert_code(
        ctl.list_snapshots(ListSnapshotsRequest::default()).await,
        Code::Unimplemented,
        "list snapshots",
    );
    assert_code(
        ctl.delete_snapshot(DeleteSnapshotRequest::default()).await,
        Code::Unimplemented,
        "delete snapshot",
    );
    // GetCapacity with parameters naming nothing real.
    let mut p = cluster_params();
    p.insert("reclaim".into(), "sometimes".into());
    assert_code(
        ctl.get_capacity(GetCapacityRequest {
            parameters: p,
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "bad params",
    );
    server.stop().await;
}

#[tokio::test]
async fn without_a_backend_the_controller_is_not_healthy() {
    let layout = Layout::new("unconfigured");
    let listener = mortar_csi::server::bind(&layout.socket).unwrap();
    let services = mortar_csi::server::Services {
        mode: Mode::Controller,
        resolver: std::sync::Arc::new(mortar_csi::ops::Unconfigured),
        default_bytes: MIB as u64,
        node: None,
    };
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(mortar_csi::server::serve(services, listener, async {
        let _ = rx.await;
    }));
    let mut c = Clients::connect(&layout.socket).await;
    // A missing required dependency is FAILED_PRECONDITION (spec, Probe errors).
    assert_code(
        c.identity.probe(ProbeRequest {}).await,
        Code::FailedPrecondition,
        "probe without a backend",
    );
    assert_code(
        c.controller.create_volume(create_req("pvc-a", MIB)).await,
        Code::Unavailable,
        "no backend",
    );
    tx.send(()).unwrap();
    task.await.unwrap().unwrap();
}
