//! What this node offers: GPUs (from `nvidia-smi`), CPU cores and memory
//! (from the OS). A node without `nvidia-smi`, or where it fails, has zero
//! GPUs and still runs CPU jobs.

use std::time::Duration;

use trainmesh_common::proto::runner::v1::{Capacity, Gpu};

use crate::backend::kubernetes::GpuProduct;
use crate::config::GpuSetting;

const NVIDIA_SMI_ARGS: [&str; 2] = [
    "--query-gpu=index,uuid,name,memory.total",
    "--format=csv,noheader,nounits",
];
const NVIDIA_SMI_TIMEOUT: Duration = Duration::from_secs(15);

/// Parses `nvidia-smi --query-gpu=index,uuid,name,memory.total
/// --format=csv,noheader,nounits`. Lines that do not parse are skipped with
/// a warning; a memory of `[N/A]` becomes 0.
pub fn parse_nvidia_smi(output: &str) -> Vec<Gpu> {
    let mut gpus = Vec::new();
    for line in output.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        if fields.len() < 4 {
            tracing::warn!(line, "unexpected nvidia-smi line; skipping it");
            continue;
        }
        let Ok(index) = fields[0].parse::<i32>() else {
            tracing::warn!(line, "unexpected nvidia-smi GPU index; skipping the line");
            continue;
        };
        let last = fields.len() - 1;
        // A model name could contain a comma: it is everything in between.
        let model = fields[2..last].join(", ");
        let memory_mib = fields[last]
            .parse::<f64>()
            .ok()
            .filter(|m| m.is_finite() && *m >= 0.0)
            .map(|m| m as i64)
            .unwrap_or(0);
        gpus.push(Gpu {
            index,
            uuid: fields[1].to_owned(),
            model,
            memory_mib,
        });
    }
    gpus.sort_by_key(|g| g.index);
    gpus.dedup_by_key(|g| g.index);
    gpus
}

/// Runs `nvidia-smi`; no GPUs when it is missing or fails.
pub async fn detect_gpus() -> Vec<Gpu> {
    let mut cmd = tokio::process::Command::new("nvidia-smi");
    cmd.args(NVIDIA_SMI_ARGS)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    match tokio::time::timeout(NVIDIA_SMI_TIMEOUT, cmd.output()).await {
        Err(_) => {
            tracing::warn!("nvidia-smi did not answer in time; registering without GPUs");
            Vec::new()
        }
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::info!("nvidia-smi not found; registering without GPUs");
            Vec::new()
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot run nvidia-smi; registering without GPUs");
            Vec::new()
        }
        Ok(Ok(out)) if !out.status.success() => {
            tracing::warn!(status = %out.status, stderr = %String::from_utf8_lossy(&out.stderr).trim(),
                "nvidia-smi failed; registering without GPUs");
            Vec::new()
        }
        Ok(Ok(out)) => parse_nvidia_smi(&String::from_utf8_lossy(&out.stdout)),
    }
}

/// `count` stand-in GPUs for tests and for nodes where detection is off.
pub fn fake_gpus(count: u32) -> Vec<Gpu> {
    (0..count as i32)
        .map(|i| Gpu {
            index: i,
            uuid: format!("GPU-fake-{i}"),
            model: "fake".into(),
            memory_mib: 0,
        })
        .collect()
}

/// The GPUs of a cluster declared by product (`--k8s-gpus`): `count` per
/// product, numbered from 0 in the order declared, the product as the
/// model so that a job's `gpu_type` matches it. The kubernetes backend maps
/// an allocation's indexes back to products with this same numbering.
pub fn declared_gpus(products: &[GpuProduct]) -> Vec<Gpu> {
    products
        .iter()
        .flat_map(|p| (0..p.count).map(move |n| (p, n)))
        .zip(0..i32::MAX)
        .map(|((p, n), index)| Gpu {
            index,
            uuid: format!("k8s-{}-{n}", p.product),
            model: p.product.clone(),
            // Unknown: the product names it, and nothing asks for memory.
            memory_mib: 0,
        })
        .collect()
}

/// `MemTotal` from `/proc/meminfo`, in MiB.
pub fn parse_meminfo_mib(meminfo: &str) -> Option<i64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut parts = line["MemTotal:".len()..].split_whitespace();
    let value: i64 = parts.next()?.parse().ok()?;
    let factor = match parts.next().unwrap_or("kB") {
        "kB" | "KB" | "kb" => 1024,
        "B" => 1,
        "MB" | "mB" => 1024 * 1024,
        _ => 1024,
    };
    Some(value.saturating_mul(factor) / (1024 * 1024))
}

pub fn memory_mib() -> i64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| parse_meminfo_mib(&m))
        .unwrap_or(0)
}

pub fn cpu_count() -> f64 {
    std::thread::available_parallelism()
        .map(|n| n.get() as f64)
        .unwrap_or(1.0)
}

/// The node's capacity, with the operator's overrides applied. GPUs
/// declared by product, when there are any, are registered instead of
/// what `gpus` says (the flags that set both are refused together).
pub async fn capacity(
    gpus: &GpuSetting,
    products: &[GpuProduct],
    cpu: Option<f64>,
    memory_mib: Option<i64>,
) -> Capacity {
    let gpus = if !products.is_empty() {
        declared_gpus(products)
    } else {
        match gpus {
            GpuSetting::Detect => detect_gpus().await,
            GpuSetting::Count(n) => fake_gpus(*n),
        }
    };
    Capacity {
        gpus,
        cpu: cpu.unwrap_or_else(cpu_count),
        memory_mib: memory_mib.unwrap_or_else(self::memory_mib),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nvidia_smi_csv() {
        let out = "0, GPU-4a1f1b2e-1111-2222-3333-444455556666, NVIDIA H100 80GB HBM3, 81559\n\
                   1, GPU-9b2c, NVIDIA H100 80GB HBM3, 81559\n";
        let gpus = parse_nvidia_smi(out);
        assert_eq!(gpus.len(), 2);
        assert_eq!(gpus[0].index, 0);
        assert_eq!(gpus[0].uuid, "GPU-4a1f1b2e-1111-2222-3333-444455556666");
        assert_eq!(gpus[0].model, "NVIDIA H100 80GB HBM3");
        assert_eq!(gpus[0].memory_mib, 81559);
        assert_eq!(gpus[1].index, 1);
    }

    #[test]
    fn tolerates_odd_lines_and_unknown_memory() {
        let out = "\r\n3, GPU-c, Tesla T4, [N/A]\r\ngarbage\nx, GPU-d, A100, 40000\n2, GPU-b, Weird, Name, 100\n";
        let gpus = parse_nvidia_smi(out);
        assert_eq!(gpus.len(), 2);
        assert_eq!(gpus[0].index, 2);
        assert_eq!(gpus[0].model, "Weird, Name");
        assert_eq!(gpus[1].index, 3);
        assert_eq!(gpus[1].memory_mib, 0);
    }

    #[test]
    fn empty_output_means_no_gpus() {
        assert!(parse_nvidia_smi("").is_empty());
        assert!(parse_nvidia_smi("No devices were found\n").is_empty());
    }

    #[test]
    fn parses_meminfo() {
        let m = "MemTotal:       16318480 kB\nMemFree:         1000 kB\n";
        assert_eq!(parse_meminfo_mib(m), Some(15936));
        assert_eq!(parse_meminfo_mib("nothing"), None);
    }

    #[test]
    fn fake_gpus_are_numbered_from_zero() {
        let g = fake_gpus(2);
        assert_eq!(g.iter().map(|g| g.index).collect::<Vec<_>>(), [0, 1]);
        assert!(fake_gpus(0).is_empty());
    }

    #[tokio::test]
    async fn overrides_win_over_detection() {
        let c = capacity(&GpuSetting::Count(0), &[], Some(3.5), Some(2048)).await;
        assert!(c.gpus.is_empty());
        assert_eq!(c.cpu, 3.5);
        assert_eq!(c.memory_mib, 2048);
    }

    #[tokio::test]
    async fn declared_products_are_registered_as_models_with_their_counts() {
        let products = [
            GpuProduct {
                product: "NVIDIA-H100-80GB-HBM3".into(),
                count: 3,
            },
            GpuProduct {
                product: "NVIDIA-A100-SXM4-40GB".into(),
                count: 2,
            },
        ];
        // The count setting is not consulted when products are declared.
        let c = capacity(&GpuSetting::Detect, &products, Some(1.0), Some(1)).await;
        let g = &c.gpus;
        assert_eq!(
            g.iter().map(|g| g.index).collect::<Vec<_>>(),
            [0, 1, 2, 3, 4]
        );
        let models: Vec<&str> = g.iter().map(|g| g.model.as_str()).collect();
        assert_eq!(
            models,
            [
                "NVIDIA-H100-80GB-HBM3",
                "NVIDIA-H100-80GB-HBM3",
                "NVIDIA-H100-80GB-HBM3",
                "NVIDIA-A100-SXM4-40GB",
                "NVIDIA-A100-SXM4-40GB",
            ]
        );
        let uuids: std::collections::HashSet<&str> = g.iter().map(|g| g.uuid.as_str()).collect();
        assert_eq!(uuids.len(), 5, "{uuids:?}");
        // What the scheduler's type match does with them.
        let h100 = g.iter().filter(|g| g.model.to_lowercase().contains("h100"));
        assert_eq!(h100.count(), 3);
    }
}
