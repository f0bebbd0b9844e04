//! Behaviour every [`VolumeOps`] implementation must show, as one async check that a
//! backend's tests call on a fresh, empty volume root. The controller's idempotency and
//! crash safety rest on exactly these properties.

use crate::ops::{DirMeta, OpsError, Reclaim, VolumeOps};

/// Panics with a description of the first property `ops` violates.
pub async fn check(ops: &dyn VolumeOps) {
    assert!(
        ops.list().await.unwrap().is_empty(),
        "start from an empty volume root"
    );

    // mkdir: exact mode, refuses a taken name.
    ops.mkdir("pvc-a", 0o777).await.unwrap();
    assert!(
        matches!(
            ops.mkdir("pvc-a", 0o777).await,
            Err(OpsError::AlreadyExists(_))
        ),
        "mkdir of a taken name"
    );
    assert!(ops.exists("pvc-a").await.unwrap());
    assert!(!ops.exists("pvc-missing").await.unwrap());

    // Records: none until set, round-trip, missing directory is NotFound.
    assert_eq!(
        ops.get_meta("pvc-a").await.unwrap(),
        None,
        "a fresh directory has no record"
    );
    let meta = DirMeta {
        limit_bytes: 5 << 20,
        reclaim: Reclaim::Archive,
        source: Some("ns/c/data/pvc-src".into()),
    };
    ops.set_meta("pvc-a", &meta).await.unwrap();
    assert_eq!(ops.get_meta("pvc-a").await.unwrap(), Some(meta.clone()));
    let plain = DirMeta {
        limit_bytes: 7 << 20,
        ..Default::default()
    };
    ops.set_meta("pvc-a", &plain).await.unwrap();
    assert_eq!(
        ops.get_meta("pvc-a").await.unwrap(),
        Some(plain),
        "source cleared, reclaim reset"
    );
    assert!(matches!(
        ops.get_meta("pvc-missing").await,
        Err(OpsError::NotFound(_))
    ));
    assert!(matches!(
        ops.set_meta("pvc-missing", &meta).await,
        Err(OpsError::NotFound(_))
    ));

    // statfs of the whole volume.
    let fs = ops.statfs().await.unwrap();
    assert!(fs.total_bytes > 0 && fs.free_bytes <= fs.total_bytes);

    // rename never replaces, and reports a missing source.
    ops.mkdir("pvc-b", 0o755).await.unwrap();
    assert!(
        matches!(
            ops.rename("pvc-a", "pvc-b").await,
            Err(OpsError::AlreadyExists(_))
        ),
        "rename onto an existing dir"
    );
    assert!(matches!(
        ops.rename("pvc-missing", "pvc-c").await,
        Err(OpsError::NotFound(_))
    ));
    ops.rename("pvc-b", "pvc-c").await.unwrap();
    let mut names = ops.list().await.unwrap();
    names.sort();
    assert_eq!(names, vec!["pvc-a".to_string(), "pvc-c".to_string()]);

    // remove_all is recursive and idempotent.
    ops.remove_all("pvc-c").await.unwrap();
    ops.remove_all("pvc-c").await.unwrap();
    assert!(!ops.exists("pvc-c").await.unwrap());

    // usage of an empty directory, copy_tree into an empty one.
    assert_eq!(ops.usage("pvc-a").await.unwrap().bytes, 0);
    assert!(matches!(
        ops.usage("pvc-missing").await,
        Err(OpsError::NotFound(_))
    ));
    ops.mkdir("pvc-d", 0o777).await.unwrap();
    ops.copy_tree("pvc-a", "pvc-d").await.unwrap();
    assert!(matches!(
        ops.copy_tree("pvc-missing", "pvc-d").await,
        Err(OpsError::NotFound(_))
    ));
    ops.remove_all("pvc-a").await.unwrap();
    ops.remove_all("pvc-d").await.unwrap();
    assert!(ops.list().await.unwrap().is_empty());
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn local_dir_ops_conform() {
        let dir = std::env::temp_dir().join(format!("mortar-csi-ops-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        super::check(&crate::ops::LocalDirOps::new(&dir)).await;
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
