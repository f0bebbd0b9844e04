//! The reconciler: `reconcile(cluster, ctx)` drives the owned objects towards the spec one
//! safe step at a time, and `error_policy` decides when to try again after a failure.
//!
//! Safety rules that shape the code:
//! - The volfile in the ConfigMap is the membership of the volume. Its brick count changes by
//!   at most one per step, and only when every brick is up and has nothing to heal, so the
//!   bricks that hold the data always keep a majority.
//! - Pods are replaced (image or template changes) one at a time with the StatefulSet's
//!   `OnDelete` strategy, again only when every brick is up and healed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::join_all;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Error as FinalizerError, Event as Finalizer, finalizer};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::{debug, info, warn};

use crate::certs::{self, CaStep, CertPlan, Leaf, LeafStep, PemData};
use crate::crd::{
    CertificateStatus, CertificatesStatus, Phase, ReclaimPolicy, SharedStorageCluster,
    SharedStorageClusterStatus,
};
use crate::health::HealthProbe;
use crate::metrics::Metrics;
use crate::resources::{self, Plan, Volfile};
use crate::status::{self, BrickObservation, Progress};
use crate::validation;

pub const FIELD_MANAGER: &str = "mortar-operator";
pub const FINALIZER: &str = "mortar.dev/bricks";
/// Health is not something the API server tells us about, so a settled cluster is looked at
/// again on this period.
pub const RESYNC: Duration = Duration::from_secs(30);
/// While a step is in flight (a brick starting or healing), look more often.
pub const PROGRESS_RESYNC: Duration = Duration::from_secs(5);
const MAX_BACKOFF: Duration = Duration::from_secs(300);
const BASE_BACKOFF: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[source] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("{0} has no namespace")]
    MissingNamespace(String),
    #[error("certificates: {0}")]
    Certificates(String),
}

impl Error {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Finalizer(e) => match e.as_ref() {
                FinalizerError::ApplyFailed(inner) | FinalizerError::CleanupFailed(inner) => {
                    inner.metric_label()
                }
                _ => "finalizer",
            },
            Error::MissingNamespace(_) => "missing_namespace",
            Error::Certificates(_) => "certificates",
        }
    }
}

impl From<kube::Error> for Error {
    fn from(e: kube::Error) -> Self {
        Error::Kube(e)
    }
}

pub struct Context {
    pub client: Client,
    pub health: Arc<dyn HealthProbe>,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// Brick image for clusters that name none.
    pub default_image: String,
    failures: Mutex<HashMap<(String, String), u32>>,
}

impl Context {
    pub fn new(
        client: Client,
        health: Arc<dyn HealthProbe>,
        metrics: Arc<Metrics>,
        default_image: String,
        instance: Option<String>,
    ) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.into(),
            instance,
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            health,
            metrics,
            default_image,
            failures: Mutex::default(),
        }
    }

    fn key(ssc: &SharedStorageCluster) -> (String, String) {
        (ssc.namespace().unwrap_or_default(), ssc.name_any())
    }

    /// Exponential backoff per cluster, so one broken cluster neither spins nor delays others.
    fn next_backoff(&self, ssc: &SharedStorageCluster) -> Duration {
        let mut failures = self.failures.lock().expect("backoff map poisoned");
        let n = failures.entry(Self::key(ssc)).or_insert(0);
        *n = n.saturating_add(1);
        BASE_BACKOFF
            .saturating_mul(1u32 << (*n - 1).min(16))
            .min(MAX_BACKOFF)
    }

    fn reset_backoff(&self, ssc: &SharedStorageCluster) {
        self.failures
            .lock()
            .expect("backoff map poisoned")
            .remove(&Self::key(ssc));
    }
}

pub async fn reconcile(ssc: Arc<SharedStorageCluster>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let ns = ssc
        .namespace()
        .ok_or_else(|| Error::MissingNamespace(ssc.name_any()))?;
    let api: Api<SharedStorageCluster> = Api::namespaced(ctx.client.clone(), &ns);
    let result = finalizer(&api, FINALIZER, ssc.clone(), |event| async {
        match event {
            Finalizer::Apply(ssc) => apply(&ssc, &ctx).await,
            Finalizer::Cleanup(ssc) => cleanup(&ssc, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    match &result {
        Ok(_) => {
            ctx.reset_backoff(&ssc);
            ctx.metrics.reconciled(started.elapsed(), "ok");
        }
        Err(e) => {
            ctx.metrics.reconciled(started.elapsed(), "error");
            ctx.metrics.failed(e.metric_label());
        }
    }
    result
}

pub fn error_policy(ssc: Arc<SharedStorageCluster>, error: &Error, ctx: Arc<Context>) -> Action {
    let delay = ctx.next_backoff(&ssc);
    warn!(cluster = %ssc.name_any(), %error, ?delay, "reconcile failed; retrying");
    Action::requeue(delay)
}

async fn apply_owned<K>(client: &Client, ns: &str, obj: &K) -> Result<K, kube::Error>
where
    K: Resource<Scope = NamespaceResourceScope>
        + Serialize
        + DeserializeOwned
        + Clone
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    // Forced: these objects are ours alone, and a conflict with a hand edit must not stall
    // the cluster ("the default settings are configured automatically").
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch(&obj.name_any(), &params, &Patch::Apply(obj))
        .await
}

/// An error the API server gives for the objects we built from the spec: the spec asks for
/// something Kubernetes refuses, which retrying cannot fix.
fn is_rejection(e: &kube::Error) -> Option<String> {
    match e {
        kube::Error::Api(status) if status.code == 422 || status.code == 400 => {
            Some(status.message.clone())
        }
        _ => None,
    }
}

fn ordinal_of(pod_name: &str, set_name: &str) -> Option<i32> {
    pod_name
        .strip_prefix(set_name)?
        .strip_prefix('-')?
        .parse()
        .ok()
}

fn claim_ordinal(claim_name: &str, set_name: &str) -> Option<i32> {
    ordinal_of(
        claim_name
            .strip_prefix(resources::CLAIM_NAME)?
            .strip_prefix('-')?,
        set_name,
    )
}

/// The current brick count: the volfile's if there is one, else the StatefulSet's.
fn current_bricks(volfile: Option<&Volfile>, sts: Option<&StatefulSet>) -> Option<i32> {
    volfile
        .map(|v| v.bricks.len() as i32)
        .or_else(|| sts.and_then(|s| s.spec.as_ref()?.replicas))
}

/// Decide the brick count for this round. `all_ready` is whether every current brick is up,
/// healed and has its pod in place.
fn next_brick_count(current: Option<i32>, wanted: i32, all_ready: bool) -> (i32, Progress) {
    let Some(current) = current else {
        return (
            wanted,
            Progress::step("Creating", format!("creating {wanted} bricks")),
        );
    };
    if wanted > current {
        if all_ready {
            let next = current + 1;
            (
                next,
                Progress::step(
                    "ScalingUp",
                    format!("adding brick b{current} ({next} of {wanted})"),
                ),
            )
        } else {
            (
                current,
                Progress::step(
                    "WaitingForHeal",
                    format!("scaling up to {wanted} once all {current} bricks are up and healed"),
                ),
            )
        }
    } else if wanted < current {
        let next = current - 1;
        if next * 2 <= current {
            (
                current,
                Progress {
                    progressing: false,
                    reason: "ScaleDownRefused".into(),
                    message: format!(
                        "removing a brick would leave {next} of {current}, below a majority of the current set"
                    ),
                },
            )
        } else if all_ready {
            (
                next,
                Progress::step(
                    "ScalingDown",
                    format!("removing brick b{next} ({next} of {wanted})"),
                ),
            )
        } else {
            (
                current,
                Progress::step(
                    "WaitingForHeal",
                    format!("scaling down to {wanted} once all {current} bricks are up and healed"),
                ),
            )
        }
    } else {
        (current, Progress::done())
    }
}

fn pod_ready_to_count(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
}

async fn set_status(
    api: &Api<SharedStorageCluster>,
    ssc: &SharedStorageCluster,
    status: &SharedStorageClusterStatus,
) -> Result<(), kube::Error> {
    let patch = serde_json::json!({
        "apiVersion": SharedStorageCluster::api_version(&()),
        "kind": SharedStorageCluster::kind(&()),
        "status": status,
    });
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch_status(&ssc.name_any(), &params, &Patch::Apply(&patch))
        .await?;
    Ok(())
}

async fn publish_phase_change(
    ctx: &Context,
    ssc: &SharedStorageCluster,
    new: &SharedStorageClusterStatus,
) {
    let old = ssc.status.as_ref().and_then(|s| s.phase);
    let Some(phase) = new.phase else { return };
    if old == Some(phase) {
        return;
    }
    let type_ = match phase {
        Phase::Degraded | Phase::Failed => EventType::Warning,
        _ => EventType::Normal,
    };
    let note = match phase {
        Phase::Failed => new
            .conditions
            .iter()
            .find(|c| c.type_ == status::CONDITION_PROGRESSING)
            .map(|c| c.message.clone()),
        _ => Some(format!(
            "{} of {} bricks ready",
            new.ready_bricks,
            new.bricks.len()
        )),
    };
    let event = KubeEvent {
        type_,
        reason: phase.to_string(),
        note,
        action: "Reconcile".into(),
        secondary: None,
    };
    // An event is a courtesy: failing to record one must not fail the reconcile.
    if let Err(e) = ctx.recorder.publish(&event, &ssc.object_ref(&())).await {
        warn!(error = %e, "could not publish event");
    }
}

async fn fail_invalid(
    ssc: &SharedStorageCluster,
    ctx: &Context,
    api: &Api<SharedStorageCluster>,
    message: &str,
) -> Result<Action, Error> {
    warn!(cluster = %ssc.name_any(), message, "spec cannot be carried out");
    let status = status::invalid(ssc.status.as_ref(), ssc.metadata.generation, message);
    set_status(api, ssc, &status).await?;
    publish_phase_change(ctx, ssc, &status).await;
    // Nothing changes until the spec does; the watch brings us back then.
    Ok(Action::await_change())
}

async fn apply(ssc: &SharedStorageCluster, ctx: &Context) -> Result<Action, Error> {
    let ns = ssc
        .namespace()
        .ok_or_else(|| Error::MissingNamespace(ssc.name_any()))?;
    let client = &ctx.client;
    let ssc_api: Api<SharedStorageCluster> = Api::namespaced(client.clone(), &ns);
    if let Err(message) = validation::validate(ssc) {
        return fail_invalid(ssc, ctx, &ssc_api, &message).await;
    }

    let set_name = resources::brick_set_name(ssc);
    let cm_api: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let sts_api: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    let pod_api: Api<Pod> = Api::namespaced(client.clone(), &ns);

    let config_map = cm_api
        .get_opt(&resources::volfile_config_map_name(ssc))
        .await?;
    let current_volfile = config_map.as_ref().and_then(|cm| {
        let text = cm.data.as_ref()?.get(resources::VOLFILE_KEY)?;
        Volfile::from_yaml(text)
            .inspect_err(|e| warn!(error = %e, "volfile in ConfigMap does not parse; rewriting it"))
            .ok()
    });
    let sts = sts_api.get_opt(&set_name).await?;
    let selector = ListParams::default().labels(&resources::label_selector_string(ssc));
    let pods = pod_api.list(&selector).await?.items;
    let pods_by_ordinal: HashMap<i32, &Pod> = pods
        .iter()
        .filter_map(|p| Some((ordinal_of(&p.name_any(), &set_name)?, p)))
        .collect();

    let certificates = match reconcile_certificates(ssc, ctx, &ns).await {
        Ok(c) => c,
        Err(Error::Kube(e)) if is_rejection(&e).is_some() => {
            let message = is_rejection(&e).unwrap_or_default();
            return fail_invalid(
                ssc,
                ctx,
                &ssc_api,
                &format!("the API server refused the certificate Secrets: {message}"),
            )
            .await;
        }
        Err(e) => return Err(e),
    };

    let current = current_bricks(current_volfile.as_ref(), sts.as_ref());
    let observed = observe_bricks(
        ssc,
        ctx,
        current.unwrap_or(0),
        &pods_by_ordinal,
        certificates.probe_tls.as_ref(),
    )
    .await;
    let all_ready = current.is_some_and(|n| {
        (0..n).all(|i| {
            pods_by_ordinal
                .get(&i)
                .is_some_and(|p| pod_ready_to_count(p))
        })
    }) && observed.iter().all(BrickObservation::ready);

    let (bricks, mut progress) = next_brick_count(current, ssc.spec.bricks, all_ready);

    let previous_generation = current_volfile.as_ref().map_or(0, |v| v.generation).max(
        ssc.status
            .as_ref()
            .map_or(0, |s| s.volfile_generation.max(0) as u64),
    );
    let mut volfile = resources::volfile(ssc, bricks, previous_generation);
    let unchanged = current_volfile
        .as_ref()
        .is_some_and(|v| v.same_content(&volfile) && v.generation == previous_generation);
    if !unchanged {
        volfile.generation = previous_generation + 1;
    }
    let plan = Plan {
        bricks,
        volfile_generation: volfile.generation,
        image: ssc
            .spec
            .image
            .clone()
            .unwrap_or_else(|| ctx.default_image.clone()),
        tls_hash: certificates.tls_hash.clone(),
    };

    let applied = async {
        apply_owned(client, &ns, &resources::headless_service(ssc)).await?;
        apply_owned(client, &ns, &resources::client_service(ssc)).await?;
        apply_owned(client, &ns, &resources::volfile_config_map(ssc, &volfile)).await?;
        apply_owned(client, &ns, &resources::brick_stateful_set(ssc, &plan)).await?;
        apply_owned(client, &ns, &resources::pod_disruption_budget(ssc)).await?;
        Ok::<_, kube::Error>(())
    }
    .await;
    if let Err(e) = applied {
        return match is_rejection(&e) {
            Some(message) => {
                fail_invalid(
                    ssc,
                    ctx,
                    &ssc_api,
                    &format!("the API server refused the bricks' objects: {message}"),
                )
                .await
            }
            None => Err(e.into()),
        };
    }
    if !unchanged {
        info!(cluster = %ssc.name_any(), generation = volfile.generation, bricks, "volfile updated");
    }

    // Roll one outdated pod only in a round that changed no membership, so a brick is never
    // both added and replaced at once.
    if current == Some(bricks)
        && !progress.progressing
        && let Some(step) = roll_one_pod(
            ssc,
            &pod_api,
            sts.as_ref(),
            &pods_by_ordinal,
            bricks,
            all_ready,
        )
        .await?
    {
        progress = step;
    }

    if !progress.progressing
        && let Some(lagging) = lagging_bricks(&observed, volfile.generation)
    {
        progress = Progress::step(
            "VolfilePropagating",
            format!(
                "bricks not yet on volfile generation {}: {lagging}",
                volfile.generation
            ),
        );
    }

    let never_ready = matches!(
        ssc.status.as_ref().and_then(|s| s.phase),
        None | Some(Phase::Pending) | Some(Phase::Failed)
    );
    if never_ready && !all_ready && !progress.progressing {
        let waiting: Vec<_> = observed
            .iter()
            .filter(|b| !b.ready())
            .map(|b| b.id.as_str())
            .collect();
        progress = Progress::step(
            "WaitingForBricks",
            format!(
                "waiting for the first start of bricks: {}",
                waiting.join(", ")
            ),
        );
    }

    let claims_left = delete_removed_claims(ssc, client, &ns, bricks, &pods_by_ordinal).await?;
    if claims_left && !progress.progressing {
        progress = Progress::step(
            "RemovingBrick",
            "waiting for removed bricks' pods to stop before deleting their claims",
        );
    }

    // The status describes the bricks of the volfile just written.
    let mut rows = observed;
    rows.truncate(bricks as usize);
    for i in rows.len() as i32..bricks {
        rows.push(observation_without_health(
            ssc,
            i,
            pods_by_ordinal.get(&i).copied(),
        ));
    }
    let mut new_status = status::build(
        ssc.status.as_ref(),
        ssc.metadata.generation,
        &rows,
        volfile.generation,
        &progress,
    );
    new_status.certificates = certificates.status.clone();
    status::set_certificates_condition(
        &mut new_status,
        certificates.ready,
        certificates.reason,
        certificates.message.clone(),
        ssc.metadata.generation,
    );
    set_status(&ssc_api, ssc, &new_status).await?;
    publish_phase_change(ctx, ssc, &new_status).await;

    let settled = !progress.progressing && new_status.phase == Some(Phase::Ready);
    Ok(Action::requeue(if settled {
        RESYNC
    } else {
        PROGRESS_RESYNC
    }))
}

/// What the certificate step leaves for the rest of the round.
struct CertOutcome {
    /// `Plan::tls_hash`: the brick Secret's data as applied (empty when there is none).
    tls_hash: String,
    /// The operator's certificate for this cluster's bricks (the admin Secret).
    probe_tls: Option<mortar_common::tls::TlsFiles>,
    status: Option<CertificatesStatus>,
    ready: bool,
    reason: &'static str,
    message: String,
}

fn pem_data(secret: Option<&Secret>) -> Option<PemData> {
    let secret = secret?;
    Some(
        secret
            .data
            .iter()
            .flatten()
            .filter_map(|(k, v)| Some((k.clone(), String::from_utf8(v.0.clone()).ok()?)))
            .collect(),
    )
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn k8s_time(unix: i64) -> Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time> {
    k8s_openapi::jiff::Timestamp::from_second(unix)
        .ok()
        .map(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time)
}

/// Observe the cluster's certificate Secrets, plan (`certs::plan`), issue what the plan
/// asks for and apply the Secrets. The CA Secret is written only when the operator makes
/// the CA or takes a step of its replacement; a CA edited by hand (a bundle, a new CA) is
/// otherwise read, never overwritten.
async fn reconcile_certificates(
    ssc: &SharedStorageCluster,
    ctx: &Context,
    ns: &str,
) -> Result<CertOutcome, Error> {
    use mortar_common::tls::{CERT_FILE, Ca, KEY_FILE, TlsFiles};
    let name = ssc.name_any();
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let ca_secret = api.get_opt(&certs::ca_secret_name(&name)).await?;
    let mut observed = certs::Observed {
        ca: pem_data(ca_secret.as_ref()),
        ..certs::Observed::default()
    };
    let mut found = HashMap::new();
    for leaf in Leaf::ALL {
        if let Some(secret) = api.get_opt(&leaf.secret_name(&name)).await? {
            observed
                .leaves
                .insert(leaf, pem_data(Some(&secret)).unwrap_or_default());
            found.insert(leaf, secret);
        }
    }
    let now = unix_now();
    let (ca, steps) = match certs::plan(&observed, now) {
        CertPlan::Blocked(why) => {
            warn!(cluster = %name, why, "the cluster's CA cannot sign; certificates left as they are");
            // Carry on with what exists: the bricks keep running on their certificates.
            let admin = observed.leaves.get(&Leaf::Admin);
            let hash = found
                .get(&Leaf::Brick)
                .map(resources::secret_hash)
                .unwrap_or_default();
            let probe_tls = admin.and_then(|a| {
                Some(TlsFiles::from_pem(
                    a.get(mortar_common::tls::CA_FILE)?.clone(),
                    a.get(CERT_FILE)?.clone(),
                    a.get(KEY_FILE)?.clone(),
                ))
            });
            return Ok(CertOutcome {
                tls_hash: hash,
                probe_tls,
                status: ssc.status.as_ref().and_then(|s| s.certificates.clone()),
                ready: false,
                reason: "CAUnusable",
                message: format!(
                    "Secret {}: {why}; no certificate is issued or renewed until it is fixed",
                    certs::ca_secret_name(&name)
                ),
            });
        }
        CertPlan::NewCa => {
            let made = Ca::generate(&format!("{ns}/{name}"))
                .map_err(|e| Error::Certificates(format!("making the CA: {e:#}")))?;
            let data = certs::ca_data(&made.cert_pem, &made.key_pem);
            apply_owned(&ctx.client, ns, &resources::ca_secret(ssc, &data)).await?;
            info!(cluster = %name, secret = %certs::ca_secret_name(&name), "made the cluster's CA");
            let steps = Leaf::ALL
                .into_iter()
                .map(|l| (l, LeafStep::Issue(certs::Reissue::OtherCa)))
                .collect();
            let info = match certs::check_ca(Some(&data), now) {
                certs::CaCheck::Usable(info) => info,
                other => {
                    return Err(Error::Certificates(format!(
                        "a CA just made does not check: {other:?}"
                    )));
                }
            };
            (info, steps)
        }
        CertPlan::Leaves {
            ca,
            steps,
            rotation: CaStep::Keep,
        } => (ca, steps),
        CertPlan::Leaves { rotation, .. } => {
            let made = match rotation {
                CaStep::Introduce => Some(
                    Ca::generate(&format!("{ns}/{name} {}", certs::format_time(now)))
                        .map_err(|e| Error::Certificates(format!("making the new CA: {e:#}")))?,
                ),
                _ => None,
            };
            let old = observed.ca.clone().unwrap_or_default();
            let made_pems = made
                .as_ref()
                .map(|c| (c.cert_pem.as_str(), c.key_pem.as_str()));
            let data = certs::rotate(&old, &rotation, made_pems, now);
            // The leaves are planned again against the Secret as it is about to be: before
            // it is written, so that a CA that does not check is never applied.
            observed.ca = Some(data.clone());
            let CertPlan::Leaves { ca, steps, .. } = certs::plan(&observed, now) else {
                return Err(Error::Certificates(format!(
                    "the CA Secret does not check after the step \"{rotation}\""
                )));
            };
            apply_owned(&ctx.client, ns, &resources::ca_secret(ssc, &data)).await?;
            info!(cluster = %name, step = %rotation, "replacing the cluster's CA");
            let event = KubeEvent {
                type_: EventType::Normal,
                reason: "CARotation".into(),
                note: Some(rotation.to_string()),
                action: "RotateCA".into(),
                secondary: None,
            };
            if let Err(e) = ctx.recorder.publish(&event, &ssc.object_ref(&())).await {
                warn!(error = %e, "could not publish event");
            }
            (ca, steps)
        }
    };

    let signer = Ca {
        cert_pem: ca.signer_pem.clone(),
        key_pem: ca.key_pem.clone(),
    };
    let mut issued = Vec::new();
    let mut leaves = Vec::new();
    let mut tls_hash = String::new();
    let mut probe_tls = None;
    for (leaf, step) in &steps {
        let (cert, key) = match step {
            LeafStep::Keep { .. } => {
                let data = &observed.leaves[leaf];
                (data[CERT_FILE].clone(), data[KEY_FILE].clone())
            }
            LeafStep::Issue(why) => {
                let made = signer
                    .issue(leaf.role(), &name, &[])
                    .map_err(|e| Error::Certificates(format!("issuing {leaf:?}: {e:#}")))?;
                issued.push(format!("{} ({why})", leaf.role().prefix()));
                made
            }
        };
        let secret = resources::tls_secret(ssc, *leaf, &ca.bundle, &cert, &key);
        // A certificate just issued is checked like any other: what the bricks get must pass.
        let data = pem_data(Some(&secret)).unwrap_or_default();
        let LeafStep::Keep { not_after } = certs::check_leaf(&ca, Some(&data), *leaf, now) else {
            return Err(Error::Certificates(format!(
                "the {leaf:?} certificate does not check after issuing"
            )));
        };
        apply_owned(&ctx.client, ns, &secret).await?;
        match leaf {
            Leaf::Brick => tls_hash = resources::secret_hash(&secret),
            Leaf::Admin => {
                probe_tls = Some(TlsFiles::from_pem(ca.bundle.clone(), cert, key));
            }
            Leaf::Client => {}
        }
        leaves.push(CertificateStatus {
            role: leaf.role().prefix().to_string(),
            secret: leaf.secret_name(&name),
            not_after: k8s_time(not_after),
        });
    }
    let earliest = leaves
        .iter()
        .filter_map(|l| l.not_after.as_ref().map(|t| t.0.as_second()))
        .min();
    if !issued.is_empty() {
        info!(cluster = %name, issued = issued.join(", "), "issued certificates");
        let event = KubeEvent {
            type_: EventType::Normal,
            reason: "CertificatesIssued".into(),
            note: Some(format!("issued: {}", issued.join(", "))),
            action: "IssueCertificates".into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&event, &ssc.object_ref(&())).await {
            warn!(error = %e, "could not publish event");
        }
    }
    Ok(CertOutcome {
        tls_hash,
        probe_tls,
        status: Some(CertificatesStatus {
            ca_secret: certs::ca_secret_name(&name),
            ca_not_after: k8s_time(ca.not_after),
            not_after: earliest.and_then(k8s_time),
            leaves,
        }),
        ready: true,
        reason: "Issued",
        message: format!(
            "CA until {}; certificates until {} (each renewed 30 days before its end)",
            certs::format_time(ca.not_after),
            earliest.map(certs::format_time).unwrap_or_default()
        ),
    })
}

fn observation_without_health(
    ssc: &SharedStorageCluster,
    ordinal: i32,
    pod: Option<&Pod>,
) -> BrickObservation {
    BrickObservation {
        id: resources::brick_id(ordinal),
        pod: resources::pod_name(ssc, ordinal),
        node: pod.and_then(|p| p.spec.as_ref()?.node_name.clone()),
        address: resources::brick_address(ssc, ordinal),
        health: None,
    }
}

async fn observe_bricks(
    ssc: &SharedStorageCluster,
    ctx: &Context,
    count: i32,
    pods: &HashMap<i32, &Pod>,
    tls: Option<&mortar_common::tls::TlsFiles>,
) -> Vec<BrickObservation> {
    let timeout = Duration::from_secs(ssc.spec.ping_timeout_seconds.max(1) as u64);
    join_all((0..count).map(|i| {
        let mut obs = observation_without_health(ssc, i, pods.get(&i).copied());
        async move {
            match ctx.health.probe(&obs.address, tls, timeout).await {
                Ok(h) => obs.health = Some(h),
                Err(e) => debug!(brick = %obs.id, error = %e, "brick did not answer"),
            }
            obs
        }
    }))
    .await
}

fn lagging_bricks(bricks: &[BrickObservation], generation: u64) -> Option<String> {
    let lagging: Vec<_> = bricks
        .iter()
        .filter(|b| {
            b.health
                .as_ref()
                .is_some_and(|h| h.up && h.generation < generation)
        })
        .map(|b| b.id.as_str())
        .collect();
    (!lagging.is_empty()).then(|| lagging.join(", "))
}

/// Replace the highest-numbered pod whose template is outdated, if it is safe now.
async fn roll_one_pod(
    ssc: &SharedStorageCluster,
    pod_api: &Api<Pod>,
    sts: Option<&StatefulSet>,
    pods: &HashMap<i32, &Pod>,
    bricks: i32,
    all_ready: bool,
) -> Result<Option<Progress>, Error> {
    let Some(update_revision) = sts.and_then(|s| s.status.as_ref()?.update_revision.clone()) else {
        return Ok(None);
    };
    let mut outdated: Vec<i32> = (0..bricks)
        .filter(|i| {
            pods.get(i).is_some_and(|p| {
                p.labels()
                    .get("controller-revision-hash")
                    .is_some_and(|h| *h != update_revision)
            })
        })
        .collect();
    outdated.sort_unstable();
    let Some(&target) = outdated.last() else {
        return Ok(None);
    };
    if !all_ready {
        return Ok(Some(Progress::step(
            "WaitingForHeal",
            format!(
                "{} bricks to update; waiting until all bricks are up and healed",
                outdated.len()
            ),
        )));
    }
    let name = resources::pod_name(ssc, target);
    info!(cluster = %ssc.name_any(), pod = %name, revision = %update_revision, "replacing brick pod");
    match pod_api.delete(&name, &DeleteParams::default()).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    Ok(Some(Progress::step(
        "RollingUpdate",
        format!(
            "replacing brick {} ({} outdated)",
            resources::brick_id(target),
            outdated.len()
        ),
    )))
}

/// A brick removed from the volume must not come back with its old data under the same id:
/// the others no longer record what it misses, so its copy would pass for current. Its claim
/// goes once its pod is gone, whatever the reclaim policy (which is about deleting the
/// cluster). Returns whether some claim still waits for its pod to stop.
async fn delete_removed_claims(
    ssc: &SharedStorageCluster,
    client: &Client,
    ns: &str,
    bricks: i32,
    pods: &HashMap<i32, &Pod>,
) -> Result<bool, Error> {
    let set_name = resources::brick_set_name(ssc);
    let pvc_api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    let selector = ListParams::default().labels(&resources::label_selector_string(ssc));
    let mut waiting = false;
    for claim in pvc_api.list(&selector).await?.items {
        let name = claim.name_any();
        let Some(ordinal) = claim_ordinal(&name, &set_name) else {
            continue;
        };
        if ordinal < bricks || claim.metadata.deletion_timestamp.is_some() {
            continue;
        }
        if pods.contains_key(&ordinal) {
            waiting = true;
            continue;
        }
        info!(cluster = %ssc.name_any(), claim = %name, "deleting claim of removed brick");
        match pvc_api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(waiting)
}

async fn cleanup(ssc: &SharedStorageCluster, ctx: &Context) -> Result<Action, Error> {
    let ns = ssc
        .namespace()
        .ok_or_else(|| Error::MissingNamespace(ssc.name_any()))?;
    // Owned objects go with the cluster through their owner references; only the claims,
    // which the StatefulSet controller creates without an owner, need a decision.
    match ssc.spec.reclaim_policy {
        ReclaimPolicy::Retain => {
            info!(cluster = %ssc.name_any(), "deleted; brick claims retained");
        }
        ReclaimPolicy::Delete => {
            let pvc_api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
            let selector = ListParams::default().labels(&resources::label_selector_string(ssc));
            let set_name = resources::brick_set_name(ssc);
            for claim in pvc_api.list(&selector).await?.items {
                let name = claim.name_any();
                if claim_ordinal(&name, &set_name).is_none()
                    || claim.metadata.deletion_timestamp.is_some()
                {
                    continue;
                }
                info!(cluster = %ssc.name_any(), claim = %name, "deleting brick claim");
                match pvc_api.delete(&name, &DeleteParams::default()).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(s)) if s.code == 404 => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
    Ok(Action::await_change())
}

/// Run the controller until the stream ends (the process is shutting down).
pub async fn run(ctx: Arc<Context>, namespace: Option<String>) {
    use futures::StreamExt;
    use kube::runtime::{Controller, watcher};

    let client = ctx.client.clone();
    let (clusters, owned) = match &namespace {
        Some(ns) => (
            Api::<SharedStorageCluster>::namespaced(client.clone(), ns),
            Some(ns.clone()),
        ),
        None => (Api::<SharedStorageCluster>::all(client.clone()), None),
    };
    fn owned_api<K>(client: &Client, ns: &Option<String>) -> Api<K>
    where
        K: Resource<Scope = NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        match ns {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    let config = watcher::Config::default();
    let owned_config =
        watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={FIELD_MANAGER}"));
    Controller::new(clusters, config)
        .owns(
            owned_api::<StatefulSet>(&client, &owned),
            owned_config.clone(),
        )
        .owns(
            owned_api::<ConfigMap>(&client, &owned),
            owned_config.clone(),
        )
        .owns(owned_api::<Service>(&client, &owned), owned_config.clone())
        .owns(
            owned_api::<PodDisruptionBudget>(&client, &owned),
            owned_config,
        )
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((obj, _)) => debug!(cluster = %obj.name, "reconciled"),
                Err(e) => debug!(error = %e, "reconcile did not complete"),
            }
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaling_steps() {
        assert_eq!(next_brick_count(None, 3, false).0, 3);
        assert_eq!(next_brick_count(Some(3), 5, true).0, 4);
        assert_eq!(next_brick_count(Some(3), 5, false).0, 3);
        assert_eq!(next_brick_count(Some(5), 3, true).0, 4);
        assert_eq!(next_brick_count(Some(5), 3, false).0, 5);
        let (n, p) = next_brick_count(Some(2), 1, true);
        assert_eq!(n, 2);
        assert_eq!(p.reason, "ScaleDownRefused");
        assert_eq!(next_brick_count(Some(3), 3, true), (3, Progress::done()));
    }

    #[test]
    fn ordinals() {
        assert_eq!(ordinal_of("vol-brick-12", "vol-brick"), Some(12));
        assert_eq!(ordinal_of("vol-brick-x", "vol-brick"), None);
        assert_eq!(ordinal_of("other-brick-1", "vol-brick"), None);
        assert_eq!(claim_ordinal("data-vol-brick-3", "vol-brick"), Some(3));
        assert_eq!(claim_ordinal("logs-vol-brick-3", "vol-brick"), None);
    }
}
