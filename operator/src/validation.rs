//! Checks of a spec that the CRD schema cannot express. A failure becomes a status condition
//! with a message a person can act on, and the operator leaves the running bricks alone.

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use crate::crd::SharedStorageCluster;

/// Longest cluster name whose brick pods still get valid names: the StatefulSet controller
/// labels pods with `<name>-brick-<10-char hash>`, and a label value has at most 63 characters.
pub const MAX_NAME_LEN: usize = 63 - "-brick-".len() - 10;

/// Every problem found, joined into one message, or `Ok` when the spec can be carried out.
pub fn validate(ssc: &SharedStorageCluster) -> Result<(), String> {
    let mut problems = Vec::new();
    let name = ssc.metadata.name.as_deref().unwrap_or_default();
    if name.len() > MAX_NAME_LEN {
        problems.push(format!(
            "name {name:?} is {} characters long; at most {MAX_NAME_LEN} leave room for the brick pods' names",
            name.len()
        ));
    }
    let spec = &ssc.spec;
    if spec.bricks < 1 {
        problems.push(format!("bricks is {}; at least 1 is needed", spec.bricks));
    }
    if !is_dns_label(&spec.volume_name) {
        problems.push(format!(
            "volumeName {:?} is not a DNS label",
            spec.volume_name
        ));
    }
    match parse_quantity(&spec.storage.size) {
        Some(bytes) if bytes >= 1.0 => {}
        Some(_) => problems.push(format!(
            "storage.size {:?} must be positive",
            spec.storage.size.0
        )),
        None => problems.push(format!(
            "storage.size {:?} is not a quantity",
            spec.storage.size.0
        )),
    }
    if let Some(image) = &spec.image
        && (image.trim().is_empty() || image.chars().any(char::is_whitespace))
    {
        problems.push(format!("image {image:?} is not an image reference"));
    }
    if let Some(resources) = &spec.resources {
        let requests = resources.requests.clone().unwrap_or_default();
        let limits = resources.limits.clone().unwrap_or_default();
        for (resource, request) in &requests {
            let Some(parsed) = parse_quantity(request) else {
                problems.push(format!(
                    "resources.requests.{resource} {:?} is not a quantity",
                    request.0
                ));
                continue;
            };
            if let Some(limit) = limits.get(resource).and_then(parse_quantity)
                && parsed > limit
            {
                problems.push(format!(
                    "resources.requests.{resource} ({}) exceeds its limit ({})",
                    request.0, limits[resource].0
                ));
            }
        }
        for (resource, limit) in &limits {
            if parse_quantity(limit).is_none() {
                problems.push(format!(
                    "resources.limits.{resource} {:?} is not a quantity",
                    limit.0
                ));
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// The value of a Kubernetes quantity, precise enough to compare sizes and requests.
pub fn parse_quantity(q: &Quantity) -> Option<f64> {
    let s = q.0.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    if number.is_empty() || number == "." {
        return None;
    }
    let value: f64 = number.parse().ok()?;
    let factor = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        exp if exp.starts_with(['e', 'E']) => 10f64.powi(exp[1..].parse().ok()?),
        _ => return None,
    };
    Some(value * factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(s: &str) -> Quantity {
        Quantity(s.into())
    }

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity(&q("10Gi")), Some(10.0 * 1024f64.powi(3)));
        assert_eq!(parse_quantity(&q("500m")), Some(0.5));
        assert_eq!(parse_quantity(&q("1e3")), Some(1000.0));
        assert_eq!(parse_quantity(&q("1.5")), Some(1.5));
        assert_eq!(parse_quantity(&q("ten")), None);
        assert_eq!(parse_quantity(&q("10GB")), None);
    }

    #[test]
    fn dns_labels() {
        assert!(is_dns_label("data"));
        assert!(is_dns_label("a-1"));
        assert!(!is_dns_label("Data"));
        assert!(!is_dns_label("-a"));
        assert!(!is_dns_label(""));
    }
}
