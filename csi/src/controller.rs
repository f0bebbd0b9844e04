//! Controller service: provisions PVCs as size-limited directories on a Mortar volume.
//!
//! The controller never mounts: it reaches volumes through [`VolumeResolver`] /
//! [`VolumeOps`]. A PVC is the directory `pvc-<id>` at the root of the volume the
//! StorageClass names; its record ([`DirMeta`]) holds the size limit and what to do on
//! delete. Creation builds the directory under a hidden scratch name and renames it into
//! place, so a crash half way never leaves a `pvc-` directory without its size limit
//! (or a half-copied clone) behind.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::caps;
use crate::csi::controller_server::Controller;
use crate::csi::controller_service_capability::{self, rpc};
use crate::csi::volume_content_source;
use crate::csi::*;
use crate::error::{CsiError, Result};
use crate::inflight::InFlight;
use crate::metrics::observe;
use crate::ops::{DirMeta, OpsError, Reclaim, VolumeOps, VolumeResolver};
use crate::tls_secret::TlsSecret;
use crate::volume_id::{
    ClusterRef, MAX_ID_LEN, VolumeId, VolumeLocation, dir_for_name, is_pvc_dir, is_volume_name,
};

/// StorageClass parameters understood by CreateVolume.
pub const PARAM_CLUSTER: &str = "cluster";
pub const PARAM_CLUSTER_NAMESPACE: &str = "clusterNamespace";
pub const PARAM_VOLFILE_SERVERS: &str = "volfileServers";
pub const PARAM_VOLUME: &str = "volume";
pub const PARAM_RECLAIM: &str = "reclaim";
/// Parameters under this prefix are added by the external-provisioner
/// (`--extra-create-metadata`) and carry no meaning for Mortar.
const K8S_PARAM_PREFIX: &str = "csi.storage.k8s.io/";

pub const DEFAULT_VOLUME: &str = "data";

pub struct ControllerService {
    resolver: Arc<dyn VolumeResolver>,
    inflight: InFlight,
    /// Capacity given to a CreateVolume that asks for none.
    default_bytes: u64,
}

impl ControllerService {
    pub fn new(resolver: Arc<dyn VolumeResolver>, default_bytes: u64) -> Self {
        ControllerService {
            resolver,
            inflight: InFlight::default(),
            default_bytes,
        }
    }

    async fn open(&self, location: &VolumeLocation) -> Result<Arc<dyn VolumeOps>> {
        Ok(self.resolver.open(location).await?)
    }

    async fn open_with(
        &self,
        location: &VolumeLocation,
        tls: Option<&TlsSecret>,
    ) -> Result<Arc<dyn VolumeOps>> {
        Ok(self.resolver.open_with(location, tls).await?)
    }
}

/// What CreateVolume's parameters ask for.
struct CreateParams {
    location: VolumeLocation,
    reclaim: Reclaim,
}

/// Reads the StorageClass parameters naming the Mortar volume: `cluster` +
/// `clusterNamespace`, or `volfileServers`, plus optional `volume` and `reclaim`.
fn parse_params(params: &HashMap<String, String>) -> Result<CreateParams> {
    for key in params.keys() {
        let known = [
            PARAM_CLUSTER,
            PARAM_CLUSTER_NAMESPACE,
            PARAM_VOLFILE_SERVERS,
            PARAM_VOLUME,
            PARAM_RECLAIM,
        ];
        if !known.contains(&key.as_str()) && !key.starts_with(K8S_PARAM_PREFIX) {
            // A typo such as `clustre` must not silently provision somewhere else.
            return Err(CsiError::InvalidArgument(format!(
                "unknown parameter {key:?}"
            )));
        }
    }
    let get = |k: &str| params.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
    let cluster = match (
        get(PARAM_CLUSTER),
        get(PARAM_CLUSTER_NAMESPACE),
        get(PARAM_VOLFILE_SERVERS),
    ) {
        (Some(name), Some(namespace), None) => ClusterRef::Named {
            namespace: namespace.into(),
            name: name.into(),
        },
        (None, None, Some(servers)) => ClusterRef::Servers(
            servers
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
        ),
        (Some(_), None, None) => return Err(CsiError::missing("parameter clusterNamespace")),
        (None, Some(_), None) => return Err(CsiError::missing("parameter cluster")),
        (None, None, None) => {
            return Err(CsiError::InvalidArgument(
                "parameters must name a Mortar cluster (cluster + clusterNamespace) or volfileServers".into(),
            ));
        }
        _ => {
            return Err(CsiError::InvalidArgument(
                "give either cluster + clusterNamespace or volfileServers, not both".into(),
            ));
        }
    };
    let volume = get(PARAM_VOLUME).unwrap_or(DEFAULT_VOLUME).to_string();
    if !is_volume_name(&volume) {
        return Err(CsiError::InvalidArgument(format!(
            "bad volume name {volume:?}"
        )));
    }
    let reclaim = match get(PARAM_RECLAIM) {
        None | Some("delete") => Reclaim::Delete,
        Some("archive") => Reclaim::Archive,
        Some(other) => {
            return Err(CsiError::InvalidArgument(format!(
                "reclaim must be \"delete\" or \"archive\", not {other:?}"
            )));
        }
    };
    let location = VolumeLocation { cluster, volume };
    // Round-trip through the id syntax so that malformed names are refused here, not
    // when the id is parsed back on delete.
    location
        .to_string()
        .parse::<VolumeId>()
        .map_err(|e| CsiError::InvalidArgument(format!("bad cluster parameters: {}", e.why)))?;
    Ok(CreateParams { location, reclaim })
}

/// The size to provision for a capacity range: at least `required_bytes`, at most
/// `limit_bytes`; returns (size, limit or 0).
fn wanted_size(range: Option<&CapacityRange>, default: u64) -> Result<(u64, u64)> {
    let Some(r) = range else {
        return Ok((default, 0));
    };
    if r.required_bytes < 0 || r.limit_bytes < 0 {
        return Err(CsiError::InvalidArgument(
            "capacity must not be negative".into(),
        ));
    }
    let (req, lim) = (r.required_bytes as u64, r.limit_bytes as u64);
    if lim > 0 && req > lim {
        return Err(CsiError::InvalidArgument(format!(
            "required_bytes {req} exceeds limit_bytes {lim}"
        )));
    }
    let size = match (req, lim) {
        (0, 0) => default,
        (0, lim) => lim.min(default.max(1)),
        (req, _) => req,
    };
    Ok((size, lim))
}

fn volume_context(id: &VolumeId) -> HashMap<String, String> {
    let mut ctx = HashMap::new();
    match &id.location.cluster {
        ClusterRef::Named { namespace, name } => {
            ctx.insert(PARAM_CLUSTER.into(), name.clone());
            ctx.insert(PARAM_CLUSTER_NAMESPACE.into(), namespace.clone());
        }
        ClusterRef::Servers(s) => {
            ctx.insert(PARAM_VOLFILE_SERVERS.into(), s.join(","));
        }
    }
    ctx.insert(PARAM_VOLUME.into(), id.location.volume.clone());
    if let Some(dir) = &id.dir {
        ctx.insert("subdir".into(), dir.clone());
    }
    ctx
}

fn check_caps(caps: &[VolumeCapability]) -> Result<()> {
    if caps.is_empty() {
        return Err(CsiError::missing("volume_capabilities"));
    }
    for cap in caps {
        caps::check(cap)?;
    }
    Ok(())
}

/// Parses an id that a CO hands back; ids Mortar never issued are unknown volumes.
fn parse_id(id: &str) -> Result<VolumeId> {
    id.parse().map_err(|e: crate::volume_id::ParseError| {
        CsiError::NotFound(format!("volume {id:?} not found ({})", e.why))
    })
}

/// Opening a volume for an existing CSI volume: a missing cluster means a missing volume.
fn unknown_volume(id: &str) -> impl Fn(CsiError) -> CsiError + '_ {
    move |e| match e {
        CsiError::NotFound(_) => CsiError::NotFound(format!("volume {id} not found")),
        other => other,
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl ControllerService {
    async fn create_volume(&self, req: CreateVolumeRequest) -> Result<CreateVolumeResponse> {
        if req.name.is_empty() {
            return Err(CsiError::missing("name"));
        }
        check_caps(&req.volume_capabilities)?;
        let (size, limit) = wanted_size(req.capacity_range.as_ref(), self.default_bytes)?;
        let params = parse_params(&req.parameters)?;
        let tls = TlsSecret::from_request(&req.secrets, "provisioner secrets")?;

        let source = match req
            .volume_content_source
            .as_ref()
            .and_then(|s| s.r#type.as_ref())
        {
            None => None,
            Some(volume_content_source::Type::Snapshot(_)) => {
                return Err(CsiError::InvalidArgument(
                    "snapshots are not supported".into(),
                ));
            }
            Some(volume_content_source::Type::Volume(v)) => {
                if v.volume_id.is_empty() {
                    return Err(CsiError::missing("volume_content_source.volume.volume_id"));
                }
                let src = parse_id(&v.volume_id)?;
                let Some(dir) = src.dir.clone() else {
                    return Err(CsiError::InvalidArgument(
                        "cannot clone a whole Mortar volume".into(),
                    ));
                };
                if src.location != params.location {
                    return Err(CsiError::InvalidArgument(
                        "a clone must be on the same Mortar volume as its source".into(),
                    ));
                }
                Some((v.volume_id.clone(), dir))
            }
        };

        let dir = dir_for_name(&req.name);
        let id = VolumeId {
            location: params.location.clone(),
            dir: Some(dir.clone()),
        };
        let volume_id = id.to_string();
        if volume_id.len() > MAX_ID_LEN {
            return Err(CsiError::InvalidArgument(format!(
                "cluster, namespace and volume names are too long for a {MAX_ID_LEN}-byte volume id"
            )));
        }
        let _guard = self.inflight.try_lock(format!("create/{}", req.name))?;
        let ops = self
            .open_with(&params.location, tls.as_ref())
            .await
            .map_err(|e| match e {
                CsiError::NotFound(_) => {
                    CsiError::Unavailable(format!("Mortar volume {} not found", params.location))
                }
                other => other,
            })?;

        let content_source = req.volume_content_source.clone();
        let respond = |capacity: u64| CreateVolumeResponse {
            volume: Some(Volume {
                capacity_bytes: capacity as i64,
                volume_id: volume_id.clone(),
                volume_context: volume_context(&id),
                content_source: content_source.clone(),
                accessible_topology: Vec::new(),
            }),
        };

        // Idempotency: the same name always maps to the same directory.
        match ops.get_meta(&dir).await {
            Ok(Some(meta)) => {
                let fits = meta.limit_bytes >= size && (limit == 0 || meta.limit_bytes <= limit);
                let same_source =
                    meta.source.as_deref() == source.as_ref().map(|(id, _)| id.as_str());
                if fits && same_source {
                    return Ok(respond(meta.limit_bytes));
                }
                return Err(CsiError::AlreadyExists(format!(
                    "volume {:?} exists with capacity {} and source {:?}, incompatible with this request",
                    req.name, meta.limit_bytes, meta.source
                )));
            }
            Ok(None) => {
                return Err(CsiError::AlreadyExists(format!(
                    "directory {dir} exists on {} but was not made by mortar-csi",
                    params.location
                )));
            }
            Err(OpsError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }

        let stats = ops.statfs().await?;
        if size > stats.total_bytes {
            return Err(CsiError::OutOfRange(format!(
                "{size} bytes requested, the Mortar volume holds {} bytes",
                stats.total_bytes
            )));
        }
        if let Some((src_id, src_dir)) = &source
            && !ops.exists(src_dir).await?
        {
            return Err(CsiError::NotFound(format!(
                "source volume {src_id} not found"
            )));
        }

        let scratch = format!(".creating-{dir}");
        // Left over by a create that crashed half way: start again.
        ops.remove_all(&scratch).await?;
        // World-writable like a fresh NFS export: pods run as arbitrary users and the CSI
        // driver is not told which; the size limit, not the mode, bounds what they can do.
        ops.mkdir(&scratch, 0o777).await?;
        if let Some((_, src_dir)) = &source {
            ops.copy_tree(src_dir, &scratch).await?;
        }
        let meta = DirMeta {
            limit_bytes: size,
            reclaim: params.reclaim,
            source: source.as_ref().map(|(id, _)| id.clone()),
        };
        ops.set_meta(&scratch, &meta).await?;
        ops.rename(&scratch, &dir).await?;
        tracing::info!(volume_id, size, clone_of = ?meta.source, "created");
        Ok(respond(size))
    }

    async fn delete_volume(&self, req: DeleteVolumeRequest) -> Result<DeleteVolumeResponse> {
        if req.volume_id.is_empty() {
            return Err(CsiError::missing("volume_id"));
        }
        let Ok(id) = req.volume_id.parse::<VolumeId>() else {
            // Not an id Mortar issued, so there is nothing of ours to delete.
            return Ok(DeleteVolumeResponse {});
        };
        let Some(dir) = id.dir.clone() else {
            // A statically provisioned whole-volume PV: deleting the PV must never wipe the
            // shared volume. Succeed so the PV object can go; the data stays.
            tracing::warn!(
                volume_id = req.volume_id,
                "not deleting a whole Mortar volume"
            );
            return Ok(DeleteVolumeResponse {});
        };
        let tls = TlsSecret::from_request(&req.secrets, "provisioner secrets")?;
        let _guard = self.inflight.try_lock(req.volume_id.clone())?;
        let ops = match self.open_with(&id.location, tls.as_ref()).await {
            Ok(ops) => ops,
            Err(CsiError::NotFound(_)) => return Ok(DeleteVolumeResponse {}),
            Err(e) => return Err(e),
        };
        let meta = match ops.get_meta(&dir).await {
            Ok(meta) => meta,
            Err(OpsError::NotFound(_)) => return Ok(DeleteVolumeResponse {}),
            Err(e) => return Err(e.into()),
        };
        if meta.is_some_and(|m| m.reclaim == Reclaim::Archive) {
            let archived = format!("archived-{dir}-{}", unix_now());
            match ops.rename(&dir, &archived).await {
                Ok(()) | Err(OpsError::NotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
            tracing::info!(volume_id = req.volume_id, archived, "archived");
        } else {
            ops.remove_all(&dir).await?;
        }
        Ok(DeleteVolumeResponse {})
    }

    async fn validate(
        &self,
        req: ValidateVolumeCapabilitiesRequest,
    ) -> Result<ValidateVolumeCapabilitiesResponse> {
        if req.volume_id.is_empty() {
            return Err(CsiError::missing("volume_id"));
        }
        if req.volume_capabilities.is_empty() {
            return Err(CsiError::missing("volume_capabilities"));
        }
        let id = parse_id(&req.volume_id)?;
        let tls = TlsSecret::from_request(&req.secrets, "secrets")?;
        let ops = self
            .open_with(&id.location, tls.as_ref())
            .await
            .map_err(unknown_volume(&req.volume_id))?;
        if let Some(dir) = &id.dir
            && !ops.exists(dir).await?
        {
            return Err(CsiError::NotFound(format!(
                "volume {} not found",
                req.volume_id
            )));
        }
        let problems: Vec<String> = req
            .volume_capabilities
            .iter()
            .filter_map(|c| caps::check(c).err().map(|e| e.to_string()))
            .collect();
        if !problems.is_empty() {
            return Ok(ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: problems.join("; "),
            });
        }
        if !req.parameters.is_empty() {
            let unconfirmed = |message: String| {
                Ok(ValidateVolumeCapabilitiesResponse {
                    confirmed: None,
                    message,
                })
            };
            match parse_params(&req.parameters) {
                Err(e) => return unconfirmed(e.to_string()),
                Ok(p) if p.location != id.location => {
                    return unconfirmed("parameters name a different Mortar volume".into());
                }
                Ok(_) => {}
            }
        }
        Ok(ValidateVolumeCapabilitiesResponse {
            confirmed: Some(validate_volume_capabilities_response::Confirmed {
                volume_context: req.volume_context,
                volume_capabilities: req.volume_capabilities,
                parameters: req.parameters,
            }),
            message: String::new(),
        })
    }

    async fn list_volumes(&self, req: ListVolumesRequest) -> Result<ListVolumesResponse> {
        if req.max_entries < 0 {
            return Err(CsiError::InvalidArgument(
                "max_entries must not be negative".into(),
            ));
        }
        // The token is the id of the first volume of the next page: stable when volumes
        // are created or deleted between pages, unlike an offset.
        if !req.starting_token.is_empty() && req.starting_token.parse::<VolumeId>().is_err() {
            return Err(CsiError::Aborted(format!(
                "invalid starting_token {:?}",
                req.starting_token
            )));
        }
        let mut all: BTreeMap<String, (VolumeId, u64)> = BTreeMap::new();
        for location in self.resolver.known().await? {
            let ops = match self.open(&location).await {
                Ok(ops) => ops,
                Err(CsiError::NotFound(_)) => continue,
                Err(e) => return Err(e),
            };
            for dir in ops.list().await? {
                if !is_pvc_dir(&dir) {
                    continue;
                }
                let Ok(Some(meta)) = ops.get_meta(&dir).await else {
                    continue;
                };
                let id = VolumeId {
                    location: location.clone(),
                    dir: Some(dir),
                };
                all.insert(id.to_string(), (id, meta.limit_bytes));
            }
        }
        let max = if req.max_entries == 0 {
            usize::MAX
        } else {
            req.max_entries as usize
        };
        let mut rest = all.range(req.starting_token.clone()..);
        let entries = rest
            .by_ref()
            .take(max)
            .map(|(key, (id, cap))| list_volumes_response::Entry {
                volume: Some(Volume {
                    capacity_bytes: *cap as i64,
                    volume_id: key.clone(),
                    volume_context: volume_context(id),
                    content_source: None,
                    accessible_topology: Vec::new(),
                }),
                status: None,
            })
            .collect();
        let next_token = rest.next().map(|(k, _)| k.clone()).unwrap_or_default();
        Ok(ListVolumesResponse {
            entries,
            next_token,
        })
    }

    async fn get_capacity(&self, req: GetCapacityRequest) -> Result<GetCapacityResponse> {
        if req
            .volume_capabilities
            .iter()
            .any(|c| caps::check(c).is_err())
        {
            // The spec asks for 0 when the capabilities cannot be served.
            return Ok(GetCapacityResponse {
                available_capacity: 0,
            });
        }
        if req.parameters.is_empty() {
            // Without a StorageClass there is no volume to measure.
            return Ok(GetCapacityResponse {
                available_capacity: 0,
            });
        }
        let params = parse_params(&req.parameters)?;
        let ops = self.open(&params.location).await?;
        let stats = ops.statfs().await?;
        Ok(GetCapacityResponse {
            available_capacity: stats.free_bytes.min(i64::MAX as u64) as i64,
        })
    }

    async fn expand(
        &self,
        req: ControllerExpandVolumeRequest,
    ) -> Result<ControllerExpandVolumeResponse> {
        if req.volume_id.is_empty() {
            return Err(CsiError::missing("volume_id"));
        }
        let Some(range) = req.capacity_range.as_ref() else {
            return Err(CsiError::missing("capacity_range"));
        };
        if range.required_bytes == 0 && range.limit_bytes == 0 {
            return Err(CsiError::InvalidArgument(
                "capacity_range asks for no size".into(),
            ));
        }
        let (size, limit) = wanted_size(Some(range), 0)?;
        if let Some(cap) = &req.volume_capability {
            caps::check(cap)?;
        }
        let id = parse_id(&req.volume_id)?;
        let Some(dir) = id.dir.clone() else {
            return Err(CsiError::FailedPrecondition(
                "a whole Mortar volume has no size limit to expand".into(),
            ));
        };
        let tls = TlsSecret::from_request(&req.secrets, "controller expand secrets")?;
        let _guard = self.inflight.try_lock(req.volume_id.clone())?;
        let ops = self
            .open_with(&id.location, tls.as_ref())
            .await
            .map_err(unknown_volume(&req.volume_id))?;
        let mut meta = match ops.get_meta(&dir).await {
            Ok(Some(meta)) => meta,
            Ok(None) => {
                return Err(CsiError::FailedPrecondition(format!(
                    "{dir} has no size record"
                )));
            }
            Err(OpsError::NotFound(_)) => {
                return Err(CsiError::NotFound(format!(
                    "volume {} not found",
                    req.volume_id
                )));
            }
            Err(e) => return Err(e.into()),
        };
        if limit > 0 && meta.limit_bytes > limit {
            return Err(CsiError::OutOfRange(format!(
                "volume is already {} bytes, above limit_bytes {limit}; shrinking is not supported",
                meta.limit_bytes
            )));
        }
        if size > meta.limit_bytes {
            let stats = ops.statfs().await?;
            if size > stats.total_bytes {
                return Err(CsiError::OutOfRange(format!(
                    "{size} bytes requested, the Mortar volume holds {} bytes",
                    stats.total_bytes
                )));
            }
            meta.limit_bytes = size;
            ops.set_meta(&dir, &meta).await?;
        }
        // The limit lives on the volume: mounted PVCs see it at once, no node step needed.
        Ok(ControllerExpandVolumeResponse {
            capacity_bytes: meta.limit_bytes as i64,
            node_expansion_required: false,
        })
    }
}

fn rpc_cap(t: rpc::Type) -> ControllerServiceCapability {
    ControllerServiceCapability {
        r#type: Some(controller_service_capability::Type::Rpc(
            controller_service_capability::Rpc { r#type: t as i32 },
        )),
    }
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        r: Request<CreateVolumeRequest>,
    ) -> Result<Response<CreateVolumeResponse>, Status> {
        let req = r.into_inner();
        let name = req.name.clone();
        observe("CreateVolume", &name, self.create_volume(req)).await
    }

    async fn delete_volume(
        &self,
        r: Request<DeleteVolumeRequest>,
    ) -> Result<Response<DeleteVolumeResponse>, Status> {
        let req = r.into_inner();
        let id = req.volume_id.clone();
        observe("DeleteVolume", &id, self.delete_volume(req)).await
    }

    async fn controller_publish_volume(
        &self,
        _: Request<ControllerPublishVolumeRequest>,
    ) -> Result<Response<ControllerPublishVolumeResponse>, Status> {
        // No attach step: the node mounts the volume over the network by itself.
        observe("ControllerPublishVolume", "", async {
            Err(CsiError::Unimplemented(
                "ControllerPublishVolume is not supported".into(),
            ))
        })
        .await
    }

    async fn controller_unpublish_volume(
        &self,
        _: Request<ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<ControllerUnpublishVolumeResponse>, Status> {
        observe("ControllerUnpublishVolume", "", async {
            Err(CsiError::Unimplemented(
                "ControllerUnpublishVolume is not supported".into(),
            ))
        })
        .await
    }

    async fn validate_volume_capabilities(
        &self,
        r: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<ValidateVolumeCapabilitiesResponse>, Status> {
        let req = r.into_inner();
        let id = req.volume_id.clone();
        observe("ValidateVolumeCapabilities", &id, self.validate(req)).await
    }

    async fn list_volumes(
        &self,
        r: Request<ListVolumesRequest>,
    ) -> Result<Response<ListVolumesResponse>, Status> {
        observe("ListVolumes", "", self.list_volumes(r.into_inner())).await
    }

    async fn get_capacity(
        &self,
        r: Request<GetCapacityRequest>,
    ) -> Result<Response<GetCapacityResponse>, Status> {
        observe("GetCapacity", "", self.get_capacity(r.into_inner())).await
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        observe("ControllerGetCapabilities", "", async {
            Ok(ControllerGetCapabilitiesResponse {
                capabilities: vec![
                    rpc_cap(rpc::Type::CreateDeleteVolume),
                    rpc_cap(rpc::Type::ListVolumes),
                    rpc_cap(rpc::Type::GetCapacity),
                    rpc_cap(rpc::Type::CloneVolume),
                    rpc_cap(rpc::Type::ExpandVolume),
                    rpc_cap(rpc::Type::SingleNodeMultiWriter),
                ],
            })
        })
        .await
    }

    async fn create_snapshot(
        &self,
        _: Request<CreateSnapshotRequest>,
    ) -> Result<Response<CreateSnapshotResponse>, Status> {
        observe("CreateSnapshot", "", async {
            Err(CsiError::Unimplemented(
                "snapshots are not supported".into(),
            ))
        })
        .await
    }

    async fn delete_snapshot(
        &self,
        _: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotResponse>, Status> {
        observe("DeleteSnapshot", "", async {
            Err(CsiError::Unimplemented(
                "snapshots are not supported".into(),
            ))
        })
        .await
    }

    async fn list_snapshots(
        &self,
        _: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        observe("ListSnapshots", "", async {
            Err(CsiError::Unimplemented(
                "snapshots are not supported".into(),
            ))
        })
        .await
    }

    async fn controller_expand_volume(
        &self,
        r: Request<ControllerExpandVolumeRequest>,
    ) -> Result<Response<ControllerExpandVolumeResponse>, Status> {
        let req = r.into_inner();
        let id = req.volume_id.clone();
        observe("ControllerExpandVolume", &id, self.expand(req)).await
    }

    async fn controller_get_volume(
        &self,
        _: Request<ControllerGetVolumeRequest>,
    ) -> Result<Response<ControllerGetVolumeResponse>, Status> {
        observe("ControllerGetVolume", "", async {
            Err(CsiError::Unimplemented(
                "ControllerGetVolume is not supported".into(),
            ))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parameters_name_one_volume() {
        let p = parse_params(&params(&[
            ("cluster", "shared"),
            ("clusterNamespace", "storage"),
        ]))
        .unwrap();
        assert_eq!(p.location.to_string(), "storage/shared/data");
        assert_eq!(p.reclaim, Reclaim::Delete);
        let p = parse_params(&params(&[
            ("volfileServers", "a:24100, b"),
            ("reclaim", "archive"),
            ("volume", "v2"),
        ]))
        .unwrap();
        assert_eq!(p.location.to_string(), "@a:24100,b/v2");
        assert_eq!(p.reclaim, Reclaim::Archive);
        assert!(
            parse_params(&params(&[
                ("cluster", "x"),
                ("clusterNamespace", "y"),
                ("csi.storage.k8s.io/pvc/name", "p")
            ]))
            .is_ok()
        );
        for bad in [
            params(&[]),
            params(&[("cluster", "x")]),
            params(&[("clusterNamespace", "y")]),
            params(&[
                ("cluster", "x"),
                ("clusterNamespace", "y"),
                ("volfileServers", "a"),
            ]),
            params(&[
                ("cluster", "x"),
                ("clusterNamespace", "y"),
                ("reclaim", "keep"),
            ]),
            params(&[
                ("cluster", "x"),
                ("clusterNamespace", "y"),
                ("clustre", "z"),
            ]),
            params(&[("cluster", "X_Y"), ("clusterNamespace", "y")]),
            params(&[
                ("cluster", "x"),
                ("clusterNamespace", "y"),
                ("volume", "../etc"),
            ]),
        ] {
            assert!(
                matches!(parse_params(&bad), Err(CsiError::InvalidArgument(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn sizes_follow_the_capacity_range() {
        let r = |req, lim| {
            Some(CapacityRange {
                required_bytes: req,
                limit_bytes: lim,
            })
        };
        assert_eq!(wanted_size(None, 7).unwrap(), (7, 0));
        assert_eq!(wanted_size(r(0, 0).as_ref(), 7).unwrap(), (7, 0));
        assert_eq!(wanted_size(r(10, 0).as_ref(), 7).unwrap(), (10, 0));
        assert_eq!(wanted_size(r(10, 20).as_ref(), 7).unwrap(), (10, 20));
        assert_eq!(wanted_size(r(0, 5).as_ref(), 7).unwrap(), (5, 5));
        assert!(wanted_size(r(30, 20).as_ref(), 7).is_err());
        assert!(wanted_size(r(-1, 0).as_ref(), 7).is_err());
    }
}
