//! The cluster's certificates: a CA of its own and the three leaf certificates the operator
//! keeps in Secrets (the bricks', the mounts', the administrators').
//!
//! `plan` is a pure function of what the Secrets hold and the time: it says, per
//! certificate, whether to keep it or issue a new one and why, so the rules are table-tested
//! without an API server. The reconciler observes the Secrets, asks `plan`, then issues and
//! applies.
//!
//! The CA Secret's `ca.crt` may hold several certificates: the first, with `ca.key`, signs;
//! all of them are trusted. That is how the operator replaces a CA before it expires
//! (`ca_step`) without a moment where two peers disagree on whom to trust:
//! 1. **Introduce**: a new CA is added to `ca.crt`, after the current one, which still
//!    signs (its key waits in `next.key`). Every peer gets the bundle: bricks restart with
//!    it, mounts are given it at their next NodePublishVolume.
//! 2. **Switch**, at least `CA_OVERLAP_SECS` later: the new CA signs (first in `ca.crt`, its
//!    key in `ca.key`); the old one stays trusted (`retiring.crt`), and every certificate is
//!    issued again by the new CA.
//! 3. **Retire**, at least `CA_OVERLAP_SECS` after that and once every certificate is the
//!    new CA's: the old CA leaves `ca.crt`.

use std::collections::BTreeMap;

use mortar_common::tls::{BRICK_SERVER_NAME, CA_FILE, CA_KEY_FILE, CERT_FILE, KEY_FILE, Role};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::pem::Pem;

/// A leaf is renewed when less than this is left of it, or less than a third of its whole
/// life for certificates shorter than 90 days.
pub const RENEW_BEFORE_SECS: i64 = 30 * 24 * 3600;

const DAY: i64 = 24 * 3600;

/// A CA is replaced when less than this is left of it, or less than a third of its whole
/// life for CAs shorter than three years.
pub const CA_RENEW_BEFORE_SECS: i64 = 365 * DAY;

/// The least time between two steps of a CA's replacement: long enough for every peer to
/// hold the new trust before anything relies on it (the kubelet refreshes a Secret volume
/// within minutes, and republishes a mount's files about as often; bricks roll one by one).
pub const CA_OVERLAP_SECS: i64 = DAY;

/// CA Secret keys of a replacement under way: the key of the CA to come (the last
/// certificate of `ca.crt`) ...
pub const NEXT_KEY_FILE: &str = "next.key";
/// ... the CA replaced, trusted until every certificate is the new one's ...
pub const RETIRING_FILE: &str = "retiring.crt";
/// ... and when the last step was taken (Unix seconds).
pub const SINCE_FILE: &str = "rotation-since";

/// The certificates the operator issues for a cluster, each in a Secret of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Leaf {
    /// Mounted by every brick pod (`--tls-dir`); also what a brick's self-heal shows.
    Brick,
    /// For mounts: the CSI node plugin receives it as the StorageClass's node-stage secret.
    Client,
    /// For the CSI controller (quotas) and the operator's own health checks.
    Admin,
}

impl Leaf {
    pub const ALL: [Leaf; 3] = [Leaf::Brick, Leaf::Client, Leaf::Admin];

    pub fn role(self) -> Role {
        match self {
            Leaf::Brick => Role::Brick,
            Leaf::Client => Role::Client,
            Leaf::Admin => Role::Admin,
        }
    }

    /// `<cluster>-brick-tls`, `<cluster>-client-tls`, `<cluster>-admin-tls`.
    pub fn secret_name(self, cluster: &str) -> String {
        format!("{cluster}-{}-tls", self.role().prefix())
    }
}

/// `<cluster>-ca`: `ca.crt` and `ca.key`.
pub fn ca_secret_name(cluster: &str) -> String {
    format!("{cluster}-ca")
}

/// A Secret's data as text (PEM is ASCII; a value that is not UTF-8 is left out, and then
/// counts as missing).
pub type PemData = BTreeMap<String, String>;

/// A CA Secret's data for a CA that signs alone: `ca.crt` and `ca.key`.
pub fn ca_data(cert_pem: &str, key_pem: &str) -> PemData {
    PemData::from([
        (CA_FILE.to_string(), cert_pem.to_string()),
        (CA_KEY_FILE.to_string(), key_pem.to_string()),
    ])
}

/// What the CA Secret holds, judged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CaCheck {
    /// No Secret yet: make a CA.
    Missing,
    Usable(CaInfo),
    /// There is a Secret but it cannot sign: left alone, reported.
    Unusable(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaInfo {
    /// The first certificate of `ca.crt`, the one `ca.key` belongs to.
    pub signer_pem: String,
    pub key_pem: String,
    /// All of `ca.crt`: what every peer trusts.
    pub bundle: String,
    pub not_before: i64,
    pub not_after: i64,
}

/// The next step of replacing the CA (see the module's doc).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CaStep {
    Keep,
    /// Make a new CA and trust it beside the current one, which still signs.
    Introduce,
    /// The CA introduced (`next_pem`, `next_key`) signs from now on.
    Switch {
        next_pem: String,
        next_key: String,
    },
    /// Every certificate is the new CA's: the old one (`retiring`) is trusted no more.
    Retire {
        retiring: String,
    },
}

impl std::fmt::Display for CaStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CaStep::Keep => "keep",
            CaStep::Introduce => "a new CA is trusted beside the current one",
            CaStep::Switch { .. } => "the new CA signs; the old one is still trusted",
            CaStep::Retire { .. } => "the old CA is trusted no more",
        })
    }
}

/// Why a leaf certificate is (re)issued.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reissue {
    Missing,
    /// Unreadable, or not what the operator issues (role, name, key).
    Invalid(String),
    /// Signed by another CA than the current one (a new CA, or a Secret edited by hand).
    OtherCa,
    /// Close to its end.
    Expiring {
        not_after: i64,
    },
}

impl std::fmt::Display for Reissue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reissue::Missing => write!(f, "missing"),
            Reissue::Invalid(why) => write!(f, "invalid ({why})"),
            Reissue::OtherCa => write!(f, "not signed by the current CA"),
            Reissue::Expiring { not_after } => {
                write!(f, "expires {}", format_time(*not_after))
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeafStep {
    Keep { not_after: i64 },
    Issue(Reissue),
}

/// What to do about a cluster's certificates this round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CertPlan {
    /// Make a CA, then every leaf.
    NewCa,
    /// The CA is usable: one step per leaf, and the CA's own.
    Leaves {
        ca: CaInfo,
        steps: BTreeMap<Leaf, LeafStep>,
        rotation: CaStep,
    },
    /// The CA Secret cannot sign: nothing is issued; what exists stays.
    Blocked(String),
}

/// The Secrets as the reconciler found them.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    pub ca: Option<PemData>,
    pub leaves: BTreeMap<Leaf, PemData>,
}

pub fn plan(observed: &Observed, now: i64) -> CertPlan {
    match check_ca(observed.ca.as_ref(), now) {
        CaCheck::Missing => CertPlan::NewCa,
        CaCheck::Unusable(why) => CertPlan::Blocked(why),
        CaCheck::Usable(ca) => {
            let steps: BTreeMap<Leaf, LeafStep> = Leaf::ALL
                .into_iter()
                .map(|leaf| (leaf, check_leaf(&ca, observed.leaves.get(&leaf), leaf, now)))
                .collect();
            let current = steps.values().all(|s| matches!(s, LeafStep::Keep { .. }));
            let data = observed.ca.as_ref().expect("a usable CA was observed");
            let rotation = ca_step(data, &ca, now, current);
            CertPlan::Leaves {
                ca,
                steps,
                rotation,
            }
        }
    }
}

/// Where the replacement of a usable CA stands, from its Secret's data, the time, and
/// whether every leaf certificate is the current CA's and kept (`leaves_current`).
pub fn ca_step(data: &PemData, ca: &CaInfo, now: i64, leaves_current: bool) -> CaStep {
    let since = data
        .get(SINCE_FILE)
        .and_then(|s| s.trim().parse::<i64>().ok())
        .unwrap_or(i64::MIN / 2);
    let overlapped = now.saturating_sub(since) >= CA_OVERLAP_SECS;
    if let Some(key) = nonempty(data, NEXT_KEY_FILE) {
        // A key whose certificate left the bundle (an edit by hand): start again.
        let Some(next_pem) = find_by_key(&ca.bundle, key, now) else {
            return CaStep::Introduce;
        };
        return if overlapped {
            CaStep::Switch {
                next_pem,
                next_key: key.to_string(),
            }
        } else {
            CaStep::Keep
        };
    }
    if let Some(retiring) = nonempty(data, RETIRING_FILE) {
        return if overlapped && leaves_current {
            CaStep::Retire {
                retiring: retiring.to_string(),
            }
        } else {
            CaStep::Keep
        };
    }
    let renew_before = CA_RENEW_BEFORE_SECS.min((ca.not_after - ca.not_before) / 3);
    if ca.not_after - now < renew_before {
        CaStep::Introduce
    } else {
        CaStep::Keep
    }
}

/// The certificate of `bundle`, other than the first, that is an unexpired CA with `key`.
fn find_by_key(bundle: &str, key: &str, now: i64) -> Option<String> {
    blocks(bundle).into_iter().skip(1).find(|b| {
        let Ok(p) = pems(b) else { return false };
        parse(&p[0]).is_ok_and(|c| {
            c.is_ca() && c.validity().not_after.timestamp() > now && key_matches(&c, key).is_ok()
        })
    })
}

/// The CA Secret's data after `step`. `made` is the new CA, for `Introduce`.
pub fn rotate(data: &PemData, step: &CaStep, made: Option<(&str, &str)>, now: i64) -> PemData {
    let mut out = data.clone();
    let bundle = blocks(data.get(CA_FILE).map(String::as_str).unwrap_or_default());
    // Whether a replacement is still under way after this step (its time is then kept).
    let under_way = match step {
        CaStep::Keep => return out,
        CaStep::Introduce => {
            let (cert, key) = made.expect("Introduce comes with the CA it introduces");
            out.insert(CA_FILE.into(), bundle.concat() + cert.trim_end() + "\n");
            out.insert(NEXT_KEY_FILE.into(), key.into());
            true
        }
        CaStep::Switch { next_pem, next_key } => {
            let mut order = vec![next_pem.clone()];
            order.extend(bundle.iter().filter(|b| *b != next_pem).cloned());
            out.insert(CA_FILE.into(), order.concat());
            out.insert(CA_KEY_FILE.into(), next_key.clone());
            out.insert(
                RETIRING_FILE.into(),
                bundle.first().cloned().unwrap_or_default(),
            );
            out.remove(NEXT_KEY_FILE);
            true
        }
        CaStep::Retire { retiring } => {
            let gone = der(retiring);
            let kept: Vec<String> = bundle.into_iter().filter(|b| der(b) != gone).collect();
            out.insert(CA_FILE.into(), kept.concat());
            out.remove(RETIRING_FILE);
            false
        }
    };
    if under_way {
        out.insert(SINCE_FILE.into(), now.to_string());
    } else {
        out.remove(SINCE_FILE);
    }
    out
}

/// The certificates of a PEM bundle, each as its own text ending in a newline.
fn blocks(bundle: &str) -> Vec<String> {
    const END: &str = "-----END CERTIFICATE-----";
    let mut out = Vec::new();
    let mut rest = bundle;
    while let Some(i) = rest.find(END) {
        let block = rest[..i + END.len()].trim_start();
        out.push(format!("{block}\n"));
        rest = &rest[i + END.len()..];
    }
    out
}

/// A certificate's DER bytes (empty when it is not PEM): the same certificate whatever its
/// text's line breaks.
fn der(pem: &str) -> Vec<u8> {
    pems(pem)
        .ok()
        .and_then(|p| p.into_iter().next())
        .map(|p| p.contents)
        .unwrap_or_default()
}

fn pems(text: &str) -> Result<Vec<Pem>, String> {
    let all: Vec<Pem> = Pem::iter_from_buffer(text.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("not PEM: {e}"))?;
    if all.is_empty() {
        return Err("no PEM block".into());
    }
    Ok(all)
}

fn parse(pem: &Pem) -> Result<X509Certificate<'_>, String> {
    if pem.label != "CERTIFICATE" {
        return Err(format!("a {} where a CERTIFICATE belongs", pem.label));
    }
    pem.parse_x509()
        .map_err(|e| format!("not an X.509 certificate: {e}"))
}

/// Whether `key_pem` is the private key of `cert`.
fn key_matches(cert: &X509Certificate<'_>, key_pem: &str) -> Result<(), String> {
    let key = rcgen::KeyPair::from_pem(key_pem).map_err(|e| format!("key: {e}"))?;
    if key.public_key_raw() == cert.public_key().subject_public_key.data.as_ref() {
        Ok(())
    } else {
        Err("the key does not belong to the certificate".into())
    }
}

fn nonempty<'a>(data: &'a PemData, key: &str) -> Option<&'a str> {
    data.get(key)
        .map(String::as_str)
        .filter(|v| !v.trim().is_empty())
}

pub fn check_ca(data: Option<&PemData>, now: i64) -> CaCheck {
    let Some(data) = data else {
        return CaCheck::Missing;
    };
    let (Some(bundle), Some(key_pem)) = (nonempty(data, CA_FILE), nonempty(data, CA_KEY_FILE))
    else {
        return CaCheck::Unusable(format!("the CA Secret needs {CA_FILE} and {CA_KEY_FILE}"));
    };
    let checked = (|| {
        let all = pems(bundle)?;
        for b in &all {
            parse(b)?;
        }
        let signer = parse(&all[0])?;
        if !signer.is_ca() {
            return Err("the first certificate of ca.crt is not a CA".into());
        }
        key_matches(&signer, key_pem)?;
        let not_after = signer.validity().not_after.timestamp();
        if not_after <= now {
            return Err(format!("the CA expired {}", format_time(not_after)));
        }
        Ok(CaInfo {
            signer_pem: blocks(bundle).swap_remove(0),
            key_pem: key_pem.to_string(),
            bundle: bundle.to_string(),
            not_before: signer.validity().not_before.timestamp(),
            not_after,
        })
    })();
    match checked {
        Ok(info) => CaCheck::Usable(info),
        Err(why) => CaCheck::Unusable(why),
    }
}

/// The one leaf check: present, readable, the role and names the operator gives, its own
/// key, signed by the current CA, and not close to its end.
pub fn check_leaf(ca: &CaInfo, data: Option<&PemData>, leaf: Leaf, now: i64) -> LeafStep {
    let Some(data) = data else {
        return LeafStep::Issue(Reissue::Missing);
    };
    let (Some(cert_pem), Some(key_pem)) = (nonempty(data, CERT_FILE), nonempty(data, KEY_FILE))
    else {
        return LeafStep::Issue(Reissue::Missing);
    };
    let invalid = |why: String| LeafStep::Issue(Reissue::Invalid(why));
    let blocks = match pems(cert_pem) {
        Ok(b) => b,
        Err(why) => return invalid(why),
    };
    let cert = match parse(&blocks[0]) {
        Ok(c) => c,
        Err(why) => return invalid(why),
    };
    let role = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .and_then(Role::of_common_name);
    if role != Some(leaf.role()) {
        return invalid(format!("not a {} certificate", leaf.role().prefix()));
    }
    if leaf == Leaf::Brick {
        let names_brick = cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .is_some_and(|san| {
                san.value
                    .general_names
                    .iter()
                    .any(|n| matches!(n, GeneralName::DNSName(d) if *d == BRICK_SERVER_NAME))
            });
        if !names_brick {
            return invalid(format!("does not name {BRICK_SERVER_NAME}"));
        }
    }
    if let Err(why) = key_matches(&cert, key_pem) {
        return invalid(why);
    }
    let signer_blocks = pems(&ca.signer_pem).expect("a usable CA parses");
    let signer = parse(&signer_blocks[0]).expect("a usable CA parses");
    if cert.issuer() != signer.subject()
        || cert.verify_signature(Some(signer.public_key())).is_err()
    {
        return LeafStep::Issue(Reissue::OtherCa);
    }
    let validity = cert.validity();
    let (not_before, not_after) = (
        validity.not_before.timestamp(),
        validity.not_after.timestamp(),
    );
    if not_before > now + 3600 {
        // Issued by a clock far ahead: peers would refuse it until then.
        return invalid(format!("not valid before {}", format_time(not_before)));
    }
    let renew_before = RENEW_BEFORE_SECS.min((not_after - not_before) / 3);
    if not_after - now < renew_before {
        return LeafStep::Issue(Reissue::Expiring { not_after });
    }
    LeafStep::Keep { not_after }
}

/// RFC 3339, for messages.
pub fn format_time(unix: i64) -> String {
    k8s_openapi::jiff::Timestamp::from_second(unix)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| unix.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mortar_common::tls::Ca;

    const DAY: i64 = 24 * 3600;

    fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    fn ca_data(ca: &Ca) -> PemData {
        PemData::from([
            (CA_FILE.to_string(), ca.cert_pem.clone()),
            (CA_KEY_FILE.to_string(), ca.key_pem.clone()),
        ])
    }

    fn leaf_data(ca: &Ca, role: Role) -> PemData {
        let (cert, key) = ca.issue(role, "vol", &[]).unwrap();
        PemData::from([
            (CA_FILE.to_string(), ca.cert_pem.clone()),
            (CERT_FILE.to_string(), cert),
            (KEY_FILE.to_string(), key),
        ])
    }

    fn usable(ca: &Ca) -> CaInfo {
        match check_ca(Some(&ca_data(ca)), now()) {
            CaCheck::Usable(info) => info,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn ca_checks() {
        let ca = Ca::generate("vol").unwrap();
        let other = Ca::generate("other").unwrap();
        let t = now();
        assert_eq!(check_ca(None, t), CaCheck::Missing);
        let info = usable(&ca);
        assert_eq!(info.bundle, ca.cert_pem);
        assert!(info.not_after > t + 3000 * DAY);
        // The signer re-encoded is the same certificate.
        assert_eq!(
            pems(&info.signer_pem).unwrap()[0].contents,
            pems(&ca.cert_pem).unwrap()[0].contents
        );

        let unusable = |data: PemData| match check_ca(Some(&data), t) {
            CaCheck::Unusable(why) => why,
            other => panic!("{other:?}"),
        };
        let mut no_key = ca_data(&ca);
        no_key.remove(CA_KEY_FILE);
        assert!(unusable(no_key).contains("ca.key"));
        let mut garbage = ca_data(&ca);
        garbage.insert(CA_FILE.into(), "hello".into());
        unusable(garbage);
        let mut wrong_key = ca_data(&ca);
        wrong_key.insert(CA_KEY_FILE.into(), other.key_pem.clone());
        assert!(unusable(wrong_key).contains("does not belong"));
        // A leaf is not a CA.
        let leaf = leaf_data(&ca, Role::Admin);
        let mut not_ca = PemData::new();
        not_ca.insert(CA_FILE.into(), leaf[CERT_FILE].clone());
        not_ca.insert(CA_KEY_FILE.into(), leaf[KEY_FILE].clone());
        assert!(unusable(not_ca).contains("not a CA"));
        // Ten years on, it has expired.
        let later = match check_ca(Some(&ca_data(&ca)), t + 3651 * DAY) {
            CaCheck::Unusable(why) => why,
            other => panic!("{other:?}"),
        };
        assert!(later.contains("expired"), "{later}");

        // A bundle: the first signs, both are trusted.
        let mut both = ca_data(&ca);
        both.insert(CA_FILE.into(), format!("{}{}", ca.cert_pem, other.cert_pem));
        match check_ca(Some(&both), t) {
            CaCheck::Usable(info) => {
                assert!(info.bundle.contains(&other.cert_pem));
                assert!(!info.signer_pem.contains(&other.cert_pem));
            }
            other => panic!("{other:?}"),
        }
    }

    /// The table of the brief: missing, valid, near expiry, signed by another CA, garbage.
    #[test]
    fn leaf_plan_table() {
        let ca = Ca::generate("vol").unwrap();
        let other = Ca::generate("other").unwrap();
        let info = usable(&ca);
        let t = now();
        let valid = leaf_data(&ca, Role::Client);
        let mut garbage = valid.clone();
        garbage.insert(
            CERT_FILE.into(),
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".into(),
        );
        let mut not_pem = valid.clone();
        not_pem.insert(CERT_FILE.into(), "garbage".into());
        let mut no_key = valid.clone();
        no_key.remove(KEY_FILE);
        let mut wrong_key = valid.clone();
        wrong_key.insert(
            KEY_FILE.into(),
            leaf_data(&ca, Role::Client)[KEY_FILE].clone(),
        );
        let admin = leaf_data(&ca, Role::Admin);
        let foreign = leaf_data(&other, Role::Client);

        type Want = fn(&LeafStep) -> bool;
        let cases: Vec<(&str, Option<&PemData>, i64, Want)> = vec![
            ("missing secret", None, t, |s| {
                *s == LeafStep::Issue(Reissue::Missing)
            }),
            ("missing key", Some(&no_key), t, |s| {
                *s == LeafStep::Issue(Reissue::Missing)
            }),
            ("valid", Some(&valid), t, |s| {
                matches!(s, LeafStep::Keep { .. })
            }),
            // A year's certificate, 40 days before its end: kept; 20 days before: renewed.
            ("40 days left", Some(&valid), t + 325 * DAY, |s| {
                matches!(s, LeafStep::Keep { .. })
            }),
            ("20 days left", Some(&valid), t + 345 * DAY, |s| {
                matches!(s, LeafStep::Issue(Reissue::Expiring { .. }))
            }),
            ("expired", Some(&valid), t + 400 * DAY, |s| {
                matches!(s, LeafStep::Issue(Reissue::Expiring { .. }))
            }),
            ("another CA", Some(&foreign), t, |s| {
                *s == LeafStep::Issue(Reissue::OtherCa)
            }),
            ("garbage PEM", Some(&garbage), t, |s| {
                matches!(s, LeafStep::Issue(Reissue::Invalid(_)))
            }),
            ("not PEM", Some(&not_pem), t, |s| {
                matches!(s, LeafStep::Issue(Reissue::Invalid(_)))
            }),
            ("another key", Some(&wrong_key), t, |s| {
                matches!(s, LeafStep::Issue(Reissue::Invalid(_)))
            }),
            ("another role", Some(&admin), t, |s| {
                matches!(s, LeafStep::Issue(Reissue::Invalid(_)))
            }),
        ];
        for (name, data, at, want) in cases {
            let step = check_leaf(&info, data, Leaf::Client, at);
            assert!(want(&step), "{name}: {step:?}");
        }
        match check_leaf(&info, Some(&valid), Leaf::Client, t) {
            LeafStep::Keep { not_after } => {
                assert!((not_after - (t + 365 * DAY)).abs() < 2 * DAY, "{not_after}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_brick_certificate_must_name_the_brick_server() {
        let ca = Ca::generate("vol").unwrap();
        let info = usable(&ca);
        let t = now();
        let brick = leaf_data(&ca, Role::Brick);
        assert!(matches!(
            check_leaf(&info, Some(&brick), Leaf::Brick, t),
            LeafStep::Keep { .. }
        ));
        // A brick role without the SAN clients check (made by hand with rcgen).
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "brick/vol");
        let issuer = rcgen::Issuer::from_ca_cert_pem(
            &ca.cert_pem,
            rcgen::KeyPair::from_pem(&ca.key_pem).unwrap(),
        )
        .unwrap();
        let cert = p.signed_by(&key, &issuer).unwrap();
        let no_san = PemData::from([
            (CERT_FILE.to_string(), cert.pem()),
            (KEY_FILE.to_string(), key.serialize_pem()),
        ]);
        match check_leaf(&info, Some(&no_san), Leaf::Brick, t) {
            LeafStep::Issue(Reissue::Invalid(why)) => assert!(why.contains("mortar-brick")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn short_certificates_renew_at_a_third_of_their_life() {
        let ca = Ca::generate("vol").unwrap();
        let info = usable(&ca);
        let t = now();
        // A 9-day certificate (made by hand): renewed with less than 3 days left.
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "admin/vol");
        p.not_before = time_of(t);
        p.not_after = time_of(t + 9 * DAY);
        let issuer = rcgen::Issuer::from_ca_cert_pem(
            &ca.cert_pem,
            rcgen::KeyPair::from_pem(&ca.key_pem).unwrap(),
        )
        .unwrap();
        let short = PemData::from([
            (
                CERT_FILE.to_string(),
                p.signed_by(&key, &issuer).unwrap().pem(),
            ),
            (KEY_FILE.to_string(), key.serialize_pem()),
        ]);
        assert!(matches!(
            check_leaf(&info, Some(&short), Leaf::Admin, t + 5 * DAY),
            LeafStep::Keep { .. }
        ));
        assert!(matches!(
            check_leaf(&info, Some(&short), Leaf::Admin, t + 7 * DAY),
            LeafStep::Issue(Reissue::Expiring { .. })
        ));
    }

    fn time_of(unix: i64) -> time::OffsetDateTime {
        time::OffsetDateTime::from_unix_timestamp(unix).unwrap()
    }

    #[test]
    fn whole_plans() {
        let ca = Ca::generate("vol").unwrap();
        let t = now();
        assert_eq!(plan(&Observed::default(), t), CertPlan::NewCa);
        let mut garbage = ca_data(&ca);
        garbage.insert(CA_FILE.into(), "x".into());
        assert!(matches!(
            plan(
                &Observed {
                    ca: Some(garbage),
                    leaves: BTreeMap::new()
                },
                t
            ),
            CertPlan::Blocked(_)
        ));
        let observed = Observed {
            ca: Some(ca_data(&ca)),
            leaves: BTreeMap::from([
                (Leaf::Brick, leaf_data(&ca, Role::Brick)),
                (Leaf::Admin, leaf_data(&ca, Role::Client)),
            ]),
        };
        match plan(&observed, t) {
            CertPlan::Leaves { steps, .. } => {
                assert!(matches!(steps[&Leaf::Brick], LeafStep::Keep { .. }));
                assert_eq!(steps[&Leaf::Client], LeafStep::Issue(Reissue::Missing));
                assert!(matches!(
                    steps[&Leaf::Admin],
                    LeafStep::Issue(Reissue::Invalid(_))
                ));
            }
            other => panic!("{other:?}"),
        }
    }

    /// A CA valid from `from` to `until` (Unix seconds), as `Ca` (cert, key).
    fn ca_between(name: &str, from: i64, until: i64) -> Ca {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let at =
            |t: i64| rcgen::date_time_ymd(1970, 1, 1) + std::time::Duration::from_secs(t as u64);
        p.not_before = at(from);
        p.not_after = at(until);
        let cert = p.self_signed(&key).unwrap();
        Ca {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    fn info_of(data: &PemData, t: i64) -> CaInfo {
        match check_ca(Some(data), t) {
            CaCheck::Usable(info) => info,
            other => panic!("{other:?}"),
        }
    }

    /// Every case of `ca_step`: when a replacement starts, waits, switches, retires.
    #[test]
    fn ca_step_table() {
        let t = now();
        let ten_years = ca_data(&Ca::generate("vol").unwrap());
        // Ten years, one month left: the year before the end has begun.
        let old = ca_between("old", t - 3620 * DAY, t + 30 * DAY);
        let ending = ca_data(&old);
        // Thirty days in all, nine left: under a third.
        let short = ca_data(&ca_between("short", t - 21 * DAY, t + 9 * DAY));
        let short_fresh = ca_data(&ca_between("short", t - 10 * DAY, t + 20 * DAY));
        let new = Ca::generate("new").unwrap();
        let introduced = rotate(
            &ending,
            &CaStep::Introduce,
            Some((&new.cert_pem, &new.key_pem)),
            t,
        );
        let switch = CaStep::Switch {
            next_pem: blocks(&new.cert_pem).remove(0),
            next_key: new.key_pem.clone(),
        };
        let switched = rotate(&introduced, &switch, None, t + 2 * DAY);
        let mut lost_key = introduced.clone();
        lost_key.insert(NEXT_KEY_FILE.into(), Ca::generate("x").unwrap().key_pem);
        let mut old_since = introduced.clone();
        old_since.insert(SINCE_FILE.into(), (t - 2 * DAY).to_string());
        let retire = CaStep::Retire {
            retiring: blocks(&old.cert_pem).remove(0),
        };

        let cases: Vec<(&str, &PemData, i64, bool, CaStep)> = vec![
            (
                "a new ten-year CA is kept",
                &ten_years,
                t,
                true,
                CaStep::Keep,
            ),
            (
                "nine years on it is replaced",
                &ten_years,
                t + 3300 * DAY,
                true,
                CaStep::Introduce,
            ),
            ("a month left", &ending, t, true, CaStep::Introduce),
            (
                "a short CA under a third of its life",
                &short,
                t,
                true,
                CaStep::Introduce,
            ),
            (
                "a short CA over a third",
                &short_fresh,
                t,
                true,
                CaStep::Keep,
            ),
            (
                "just introduced: wait",
                &introduced,
                t + 3600,
                true,
                CaStep::Keep,
            ),
            (
                "introduced a day ago: switch",
                &introduced,
                t + DAY,
                true,
                switch.clone(),
            ),
            (
                "the since mark decides, not the clock alone",
                &old_since,
                t,
                true,
                switch.clone(),
            ),
            (
                "next.key without its certificate: again",
                &lost_key,
                t + DAY,
                true,
                CaStep::Introduce,
            ),
            (
                "just switched: wait",
                &switched,
                t + 2 * DAY + 60,
                true,
                CaStep::Keep,
            ),
            (
                "switched a day ago, leaves not reissued yet",
                &switched,
                t + 4 * DAY,
                false,
                CaStep::Keep,
            ),
            (
                "switched a day ago, leaves reissued: retire",
                &switched,
                t + 4 * DAY,
                true,
                retire.clone(),
            ),
        ];
        for (what, data, at, current, want) in cases {
            let info = info_of(data, at);
            assert_eq!(ca_step(data, &info, at, current), want, "{what}");
        }
    }

    /// What each step leaves in the Secret: who signs, whom everyone trusts.
    #[test]
    fn a_ca_is_replaced_in_three_steps_and_always_trusts_the_signer_of_the_step_before() {
        let t = now();
        let old = ca_between("old", t - 3620 * DAY, t + 30 * DAY);
        let new = Ca::generate("new").unwrap();
        let start = ca_data(&old);
        let d1 = rotate(
            &start,
            &CaStep::Introduce,
            Some((&new.cert_pem, &new.key_pem)),
            t,
        );
        let i1 = info_of(&d1, t);
        // The old CA still signs; both are trusted.
        assert_eq!(der(&i1.signer_pem), der(&old.cert_pem));
        assert_eq!(blocks(&i1.bundle).len(), 2);
        assert!(
            blocks(&i1.bundle)
                .iter()
                .any(|b| der(b) == der(&new.cert_pem))
        );
        assert_eq!(d1[SINCE_FILE], t.to_string());
        // The old CA's certificates are still current: nothing to reissue yet.
        let leaf = leaf_data(&old, Role::Client);
        assert!(matches!(
            check_leaf(&i1, Some(&leaf), Leaf::Client, t),
            LeafStep::Keep { .. }
        ));

        let t2 = t + DAY;
        let step = ca_step(&d1, &i1, t2, true);
        assert!(
            matches!(step, CaStep::Switch { .. }),
            "no switch a day later: {step:?}"
        );
        let d2 = rotate(&d1, &step, None, t2);
        let i2 = info_of(&d2, t2);
        assert_eq!(der(&i2.signer_pem), der(&new.cert_pem));
        assert_eq!(i2.key_pem, new.key_pem);
        assert!(!d2.contains_key(NEXT_KEY_FILE));
        assert_eq!(der(&d2[RETIRING_FILE]), der(&old.cert_pem));
        assert_eq!(blocks(&i2.bundle).len(), 2, "the old CA is still trusted");
        // Now every certificate of the old CA is reissued.
        assert_eq!(
            check_leaf(&i2, Some(&leaf), Leaf::Client, t2),
            LeafStep::Issue(Reissue::OtherCa)
        );

        let t3 = t2 + DAY;
        let step = ca_step(&d2, &i2, t3, true);
        assert!(matches!(step, CaStep::Retire { .. }), "{step:?}");
        let d3 = rotate(&d2, &step, None, t3);
        let i3 = info_of(&d3, t3);
        assert_eq!(blocks(&i3.bundle).len(), 1);
        assert_eq!(der(&i3.bundle), der(&new.cert_pem));
        assert!(!d3.contains_key(RETIRING_FILE) && !d3.contains_key(SINCE_FILE));
        assert_eq!(ca_step(&d3, &i3, t3 + DAY, true), CaStep::Keep);
    }
}
