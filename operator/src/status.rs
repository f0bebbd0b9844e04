//! Turning what the bricks say into the cluster's status: phase, per-brick rows, conditions.
//! Pure functions, so the rules are tested without any API server.

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use crate::crd::{BrickStatus, Phase, SharedStorageClusterStatus};
use crate::health::BrickHealth;

pub const CONDITION_AVAILABLE: &str = "Available";
pub const CONDITION_DEGRADED: &str = "Degraded";
pub const CONDITION_PROGRESSING: &str = "Progressing";
pub const CONDITION_CERTIFICATES: &str = "CertificatesReady";

/// One brick of the volfile as the reconciler saw it this round.
#[derive(Clone, Debug, Default)]
pub struct BrickObservation {
    pub id: String,
    pub pod: String,
    pub node: Option<String>,
    pub address: String,
    /// `None` when the brick could not be asked (no answer, or no pod yet).
    pub health: Option<BrickHealth>,
}

impl BrickObservation {
    pub fn up(&self) -> bool {
        self.health.as_ref().is_some_and(|h| h.up)
    }

    pub fn heal_pending(&self) -> u64 {
        self.health.as_ref().map_or(0, |h| h.heal_pending)
    }

    /// Up and with nothing to heal: the only state in which a brick counts as ready, so a new
    /// or returning brick is not counted before its heal is done.
    pub fn ready(&self) -> bool {
        self.up() && self.heal_pending() == 0
    }
}

/// What the reconciler is doing about the spec, reported in the Progressing condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Progress {
    pub progressing: bool,
    pub reason: String,
    pub message: String,
}

impl Progress {
    pub fn done() -> Self {
        Self {
            progressing: false,
            reason: "Reconciled".into(),
            message: "all bricks match the spec".into(),
        }
    }

    pub fn step(reason: &str, message: impl Into<String>) -> Self {
        Self {
            progressing: true,
            reason: reason.into(),
            message: message.into(),
        }
    }
}

/// The phase, most severe first. A cluster that was never Ready is Pending while its bricks
/// come up, rather than alarming anyone as Degraded.
pub fn phase(previous: Option<Phase>, bricks: &[BrickObservation]) -> Phase {
    let all_ready = bricks.iter().all(BrickObservation::ready);
    let never_ready = matches!(previous, None | Some(Phase::Pending) | Some(Phase::Failed));
    if bricks.is_empty() || (never_ready && !all_ready) {
        return Phase::Pending;
    }
    if bricks.iter().any(|b| !b.up()) {
        Phase::Degraded
    } else if !all_ready {
        Phase::Healing
    } else {
        Phase::Ready
    }
}

pub fn brick_rows(bricks: &[BrickObservation]) -> Vec<BrickStatus> {
    bricks
        .iter()
        .map(|b| BrickStatus {
            id: b.id.clone(),
            pod: b.pod.clone(),
            node: b.node.clone(),
            address: b.address.clone(),
            up: b.up(),
            heal_pending: saturating_i64(b.heal_pending()),
        })
        .collect()
}

/// Every brick holds the whole volume, so the volume is as large as its smallest brick.
pub fn capacity(bricks: &[BrickObservation]) -> Option<Quantity> {
    bricks
        .iter()
        .filter(|b| b.up())
        .filter_map(|b| b.health.as_ref().map(|h| h.capacity_bytes))
        .filter(|c| *c > 0)
        .min()
        .map(|c| Quantity(c.to_string()))
}

fn saturating_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn condition(
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
) -> Condition {
    Condition {
        type_: type_.into(),
        status: if status { "True" } else { "False" }.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: Time(Timestamp::now()),
    }
}

/// Replace `new`'s transition time by the old one when the status did not change, so the
/// time says when the condition last flipped, as Kubernetes conventions require.
pub fn merge_conditions(previous: &[Condition], mut new: Vec<Condition>) -> Vec<Condition> {
    for c in &mut new {
        if let Some(old) = previous.iter().find(|o| o.type_ == c.type_)
            && old.status == c.status
        {
            c.last_transition_time = old.last_transition_time.clone();
        }
    }
    new
}

fn ids(bricks: &[&BrickObservation]) -> String {
    bricks
        .iter()
        .map(|b| b.id.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The status of a cluster whose spec was accepted.
pub fn build(
    previous: Option<&SharedStorageClusterStatus>,
    generation: Option<i64>,
    bricks: &[BrickObservation],
    volfile_generation: u64,
    progress: &Progress,
) -> SharedStorageClusterStatus {
    let previous_phase = previous.and_then(|p| p.phase);
    let phase = phase(previous_phase, bricks);
    let up: Vec<_> = bricks.iter().filter(|b| b.up()).collect();
    let down: Vec<_> = bricks.iter().filter(|b| !b.up()).collect();
    let healing: Vec<_> = bricks.iter().filter(|b| b.up() && !b.ready()).collect();
    let quorum = !bricks.is_empty() && up.len() * 2 > bricks.len();

    let available = if quorum {
        condition(
            CONDITION_AVAILABLE,
            true,
            "QuorumUp",
            format!(
                "{} of {} bricks up: the volume accepts writes",
                up.len(),
                bricks.len()
            ),
            generation,
        )
    } else {
        condition(
            CONDITION_AVAILABLE,
            false,
            "QuorumLost",
            format!(
                "{} of {} bricks up: writes need a majority of {}",
                up.len(),
                bricks.len(),
                bricks.len() / 2 + 1
            ),
            generation,
        )
    };
    let degraded = if !down.is_empty() {
        condition(
            CONDITION_DEGRADED,
            true,
            "BricksDown",
            format!("bricks down: {}", ids(&down)),
            generation,
        )
    } else if !healing.is_empty() {
        condition(
            CONDITION_DEGRADED,
            true,
            "HealPending",
            format!("bricks healing: {}", ids(&healing)),
            generation,
        )
    } else {
        condition(
            CONDITION_DEGRADED,
            false,
            "AllBricksUp",
            "all bricks up and in sync".into(),
            generation,
        )
    };
    let progressing = condition(
        CONDITION_PROGRESSING,
        progress.progressing,
        &progress.reason,
        progress.message.clone(),
        generation,
    );
    let conditions = merge_conditions(
        previous
            .map(|p| p.conditions.as_slice())
            .unwrap_or_default(),
        vec![available, degraded, progressing],
    );

    SharedStorageClusterStatus {
        phase: Some(phase),
        bricks: brick_rows(bricks),
        ready_bricks: bricks.iter().filter(|b| b.ready()).count() as i32,
        heal_pending: bricks
            .iter()
            .map(|b| saturating_i64(b.heal_pending()))
            .sum(),
        volfile_generation: saturating_i64(volfile_generation),
        capacity: capacity(bricks),
        observed_generation: generation,
        conditions,
        certificates: previous.and_then(|p| p.certificates.clone()),
    }
}

/// Adds or replaces the CertificatesReady condition, keeping its transition time while its
/// status stays the same.
pub fn set_certificates_condition(
    status: &mut SharedStorageClusterStatus,
    ready: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
) {
    let new = condition(CONDITION_CERTIFICATES, ready, reason, message, generation);
    let merged = merge_conditions(&status.conditions, vec![new]);
    status
        .conditions
        .retain(|c| c.type_ != CONDITION_CERTIFICATES);
    status.conditions.extend(merged);
}

/// The status of a cluster whose spec cannot be carried out. What is known about the bricks
/// stays; only the phase and the Progressing condition say why nothing moves.
pub fn invalid(
    previous: Option<&SharedStorageClusterStatus>,
    generation: Option<i64>,
    message: &str,
) -> SharedStorageClusterStatus {
    let mut status = previous.cloned().unwrap_or_default();
    let progressing = condition(
        CONDITION_PROGRESSING,
        false,
        "InvalidSpec",
        message.to_string(),
        generation,
    );
    let mut conditions: Vec<Condition> = status
        .conditions
        .iter()
        .filter(|c| c.type_ != CONDITION_PROGRESSING)
        .cloned()
        .collect();
    conditions.push(progressing);
    status.conditions = merge_conditions(&status.conditions, conditions);
    status.phase = Some(Phase::Failed);
    status.observed_generation = generation;
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    fn brick(id: &str, up: bool, heal: u64) -> BrickObservation {
        BrickObservation {
            id: id.into(),
            health: up.then(|| BrickHealth {
                up: true,
                heal_pending: heal,
                capacity_bytes: 100,
                ..BrickHealth::default()
            }),
            ..BrickObservation::default()
        }
    }

    #[test]
    fn phases() {
        let all_up = [
            brick("b0", true, 0),
            brick("b1", true, 0),
            brick("b2", true, 0),
        ];
        let one_down = [
            brick("b0", true, 0),
            brick("b1", false, 0),
            brick("b2", true, 0),
        ];
        let healing = [
            brick("b0", true, 3),
            brick("b1", true, 0),
            brick("b2", true, 0),
        ];
        assert_eq!(phase(None, &all_up), Phase::Ready);
        assert_eq!(phase(None, &one_down), Phase::Pending);
        assert_eq!(phase(Some(Phase::Ready), &one_down), Phase::Degraded);
        assert_eq!(phase(Some(Phase::Ready), &healing), Phase::Healing);
        assert_eq!(phase(Some(Phase::Degraded), &all_up), Phase::Ready);
        assert_eq!(phase(Some(Phase::Ready), &[]), Phase::Pending);
    }

    #[test]
    fn transition_time_kept_while_status_unchanged() {
        let bricks = [brick("b0", true, 0)];
        let first = build(None, Some(1), &bricks, 1, &Progress::done());
        let mut aged = first.clone();
        aged.conditions[0].last_transition_time = Time(Timestamp::UNIX_EPOCH);
        let second = build(Some(&aged), Some(1), &bricks, 1, &Progress::done());
        assert_eq!(
            second.conditions[0].last_transition_time,
            Time(Timestamp::UNIX_EPOCH)
        );
        let down = [brick("b0", false, 0)];
        let third = build(Some(&aged), Some(1), &down, 1, &Progress::done());
        assert_ne!(
            third.conditions[0].last_transition_time,
            Time(Timestamp::UNIX_EPOCH)
        );
    }
}
