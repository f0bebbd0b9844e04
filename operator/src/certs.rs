//! The cluster's certificates: a CA of its own and the three leaf certificates the operator
//! keeps in Secrets (the bricks', the mounts', the administrators').
//!
//! `plan` is a pure function of what the Secrets hold and the time: it says, per
//! certificate, whether to keep it or issue a new one and why, so the rules are table-tested
//! without an API server. The reconciler observes the Secrets, asks `plan`, then issues and
//! applies.
//!
//! The CA is made once and never replaced by the operator: a new CA means every mount must
//! be given new files, which is an operator's (a human's) decision (SECURITY.md). Its
//! Secret's `ca.crt` may hold several certificates: the first, with `ca.key`, signs; all of
//! them are trusted, which is how a CA is replaced without a moment where peers disagree.

use std::collections::BTreeMap;

use mortar_common::tls::{BRICK_SERVER_NAME, CA_FILE, CA_KEY_FILE, CERT_FILE, KEY_FILE, Role};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::pem::Pem;

/// A leaf is renewed when less than this is left of it, or less than a third of its whole
/// life for certificates shorter than 90 days.
pub const RENEW_BEFORE_SECS: i64 = 30 * 24 * 3600;

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
    pub not_after: i64,
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
    /// The CA is usable: one step per leaf.
    Leaves {
        ca: CaInfo,
        steps: BTreeMap<Leaf, LeafStep>,
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
            let steps = Leaf::ALL
                .into_iter()
                .map(|leaf| (leaf, check_leaf(&ca, observed.leaves.get(&leaf), leaf, now)))
                .collect();
            CertPlan::Leaves { ca, steps }
        }
    }
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
        let blocks = pems(bundle)?;
        for b in &blocks {
            parse(b)?;
        }
        let signer = parse(&blocks[0])?;
        if !signer.is_ca() {
            return Err("the first certificate of ca.crt is not a CA".into());
        }
        key_matches(&signer, key_pem)?;
        let not_after = signer.validity().not_after.timestamp();
        if not_after <= now {
            return Err(format!("the CA expired {}", format_time(not_after)));
        }
        Ok(CaInfo {
            signer_pem: format!("{}\n", first_block(bundle)),
            key_pem: key_pem.to_string(),
            bundle: bundle.to_string(),
            not_after,
        })
    })();
    match checked {
        Ok(info) => CaCheck::Usable(info),
        Err(why) => CaCheck::Unusable(why),
    }
}

/// The text of the first certificate of a PEM bundle (and whatever precedes it, which PEM
/// readers skip).
fn first_block(bundle: &str) -> &str {
    const END: &str = "-----END CERTIFICATE-----";
    match bundle.find(END) {
        Some(i) => &bundle[..i + END.len()],
        None => bundle,
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
}
