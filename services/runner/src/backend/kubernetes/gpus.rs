//! The cluster's GPUs declared by product (`--k8s-gpus PRODUCT=COUNT`).
//!
//! A runner for a whole cluster cannot ask `nvidia-smi`, so the operator
//! says what the cluster has. The product is the value of the node label
//! NVIDIA GPU feature discovery sets (`nvidia.com/gpu.product`, e.g.
//! `NVIDIA-H100-80GB-HBM3`): the runner registers it as the GPUs' model,
//! so the scheduler's type match ("H100" in that string) works as it does
//! for a node, and the same string selects the nodes an attempt's pods may
//! run on, so Kubernetes cannot place them on GPUs of another type.

use std::collections::HashSet;
use std::str::FromStr;

use k8s_openapi::api::core::v1::{
    Affinity, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm,
};

use super::names;
use crate::error::Error;
use crate::inventory;

/// The node label GPU feature discovery writes the GPU product into.
pub const DEFAULT_PRODUCT_LABEL: &str = "nvidia.com/gpu.product";

/// The most GPUs one runner may declare. Each is an entry of the runner's
/// registration; far more than any one cluster has, so a larger total is
/// a typo, refused before it becomes a registration the scheduler cannot
/// take.
pub const MAX_DECLARED_GPUS: u64 = 65_536;

/// `count` GPUs of one product.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuProduct {
    /// The product label's value on the nodes with these GPUs.
    pub product: String,
    pub count: u32,
}

impl GpuProduct {
    /// Why this entry cannot be used, if it cannot.
    pub fn check(&self) -> Result<(), String> {
        if self.product.is_empty() {
            return Err("the product must not be empty".into());
        }
        // It is matched against a node label, so it must be one; GPU
        // feature discovery writes `NVIDIA-H100-80GB-HBM3` where
        // `nvidia-smi` says "NVIDIA H100 80GB HBM3".
        if !names::is_label_value(&self.product) {
            return Err(format!(
                "the product `{}` is not a label value (letters, digits, `-`, `_` and `.`, \
                 at most 63, e.g. NVIDIA-H100-80GB-HBM3)",
                self.product
            ));
        }
        if self.count == 0 {
            return Err("the count must be at least 1".into());
        }
        Ok(())
    }
}

impl FromStr for GpuProduct {
    type Err = String;
    /// `PRODUCT=COUNT`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (product, count) = s
            .split_once('=')
            .ok_or_else(|| "expected PRODUCT=COUNT".to_owned())?;
        let count = count
            .trim()
            .parse::<u32>()
            .map_err(|_| "the count must be a whole number of GPUs".to_owned())?;
        let p = GpuProduct {
            product: product.trim().to_owned(),
            count,
        };
        p.check()?;
        Ok(p)
    }
}

/// Why a whole declaration cannot be used, if it cannot: a bad entry, a
/// product named twice (which count would be meant?), or a total beyond
/// [`MAX_DECLARED_GPUS`].
pub fn check_products(products: &[GpuProduct]) -> Result<(), String> {
    let mut seen = HashSet::new();
    let mut total: u64 = 0;
    for p in products {
        p.check()
            .map_err(|e| format!("`--k8s-gpus` `{}={}`: {e}", p.product, p.count))?;
        if !seen.insert(p.product.as_str()) {
            return Err(format!(
                "`--k8s-gpus` names `{}` twice: give each product once, with its total",
                p.product
            ));
        }
        total += u64::from(p.count);
    }
    if total > MAX_DECLARED_GPUS {
        return Err(format!(
            "`--k8s-gpus` declares {total} GPUs, more than the {MAX_DECLARED_GPUS} one runner registers"
        ));
    }
    Ok(())
}

/// The products of the GPUs at `indexes`, in the order declared, each
/// once. Indexes are the ones [`inventory::declared_gpus`] registered; one
/// that is not (an assignment meant for another registration) is an
/// [`Error::UnknownGpu`], as on the other backends.
pub fn products_of(products: &[GpuProduct], indexes: &[i32]) -> Result<Vec<String>, Error> {
    let gpus = inventory::declared_gpus(products);
    let mut wanted = HashSet::new();
    for &index in indexes {
        // Declared GPUs are numbered 0, 1, … without gaps: the index is
        // the position.
        let gpu = usize::try_from(index)
            .ok()
            .and_then(|i| gpus.get(i))
            .filter(|g| g.index == index)
            .ok_or(Error::UnknownGpu { index })?;
        wanted.insert(gpu.model.as_str());
    }
    Ok(products
        .iter()
        .filter(|p| wanted.contains(p.product.as_str()))
        .map(|p| p.product.clone())
        .collect())
}

/// Requires a node whose `label` is one of `products`. Required, not
/// preferred: a pod on a node of another type would use GPUs the
/// scheduler counted as free.
pub fn node_affinity(label: &str, products: Vec<String>) -> Affinity {
    Affinity {
        node_affinity: Some(NodeAffinity {
            required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                node_selector_terms: vec![NodeSelectorTerm {
                    match_expressions: Some(vec![NodeSelectorRequirement {
                        key: label.to_owned(),
                        operator: "In".into(),
                        values: Some(products),
                    }]),
                    match_fields: None,
                }],
            }),
            preferred_during_scheduling_ignored_during_execution: None,
        }),
        ..Affinity::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn declared() -> Vec<GpuProduct> {
        vec![
            GpuProduct {
                product: "NVIDIA-H100-80GB-HBM3".into(),
                count: 2,
            },
            GpuProduct {
                product: "NVIDIA-A100-SXM4-40GB".into(),
                count: 3,
            },
        ]
    }

    #[test]
    fn indexes_map_back_to_their_products() {
        let p = declared();
        assert_eq!(products_of(&p, &[0, 1]).unwrap(), ["NVIDIA-H100-80GB-HBM3"]);
        assert_eq!(products_of(&p, &[2, 4]).unwrap(), ["NVIDIA-A100-SXM4-40GB"]);
        assert_eq!(
            products_of(&p, &[4, 1]).unwrap(),
            ["NVIDIA-H100-80GB-HBM3", "NVIDIA-A100-SXM4-40GB"]
        );
        assert!(products_of(&p, &[]).unwrap().is_empty());
    }

    #[test]
    fn an_index_nobody_registered_is_an_unknown_gpu() {
        for index in [5, -1] {
            let err = products_of(&declared(), &[0, index]).unwrap_err();
            assert!(matches!(err, Error::UnknownGpu { index: i } if i == index));
        }
    }
}
