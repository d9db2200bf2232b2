//! The node affinity that pins an attempt's pods to nodes with the product
//! of the GPUs it was allocated, in the bodies the backend POSTs (against
//! the scripted API server) and as pure functions of the launch request.

use serde_json::{json, Value};

use super::fake_api::{self, status};
use super::gpus::GpuProduct;
use super::test_support::*;
use super::*;

const H100: &str = "NVIDIA-H100-80GB-HBM3";
const A100: &str = "NVIDIA-A100-SXM4-40GB";

/// A cluster with 8 A100s (indexes 0–7) and 32 H100s (indexes 8–39): the
/// H100s come second, so a mapping that ignored the indexes would pick
/// the wrong product.
fn typed_config() -> KubernetesConfig {
    KubernetesConfig {
        gpus: vec![
            GpuProduct {
                product: A100.into(),
                count: 8,
            },
            GpuProduct {
                product: H100.into(),
                count: 32,
            },
        ],
        ..config()
    }
}

/// The pod spec's required node-selector terms, as the API server gets
/// them.
fn required_terms(pod_spec: &Value) -> &Value {
    let node = &pod_spec["affinity"]["nodeAffinity"];
    assert!(node
        .get("preferredDuringSchedulingIgnoredDuringExecution")
        .is_none());
    &node["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
}

fn pinned_to(key: &str, products: &[&str]) -> Value {
    json!([{"matchExpressions": [{"key": key, "operator": "In", "values": products}]}])
}

/// The object for `req` built with `cfg`, as JSON.
fn body(req: &LaunchRequest, cfg: &KubernetesConfig) -> Result<Value, crate::error::Error> {
    let (_, obj) = body::object(req, cfg, "training")?;
    Ok(serde_json::to_value(&obj).unwrap())
}

fn request_with(workers: u32, gpus: u32, gpu_indexes: Vec<i32>) -> LaunchRequest {
    let mut req = request(
        std::path::Path::new("/tmp/a"),
        crate::logs::OutputSink::closed(),
        workers,
    );
    req.details.gpus = gpus;
    req.gpu_indexes = gpu_indexes;
    req
}

#[tokio::test]
async fn a_typed_h100_allocation_pins_the_job_pod_to_h100_nodes() {
    let (client, log) = fake_api::client(|r| match (r.method.as_str(), r.path.as_str()) {
        ("POST", JOBS) => created(r),
        _ => status(404, "NotFound", "unexpected"),
    });
    let (w, _launched) = launch_with(client, typed_config(), 0, (8..16).collect()).await;
    drop(w.unwrap());
    let reqs = requests(&log);
    assert_eq!(reqs.len(), 1);
    let spec = &reqs[0].body["spec"]["template"]["spec"];
    assert_eq!(
        required_terms(spec),
        &pinned_to("nvidia.com/gpu.product", &[H100])
    );
    // The device plugin still hands out the GPUs; the affinity only
    // chooses the node.
    assert_eq!(
        spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"],
        "8"
    );
    assert_eq!(spec["tolerations"][0]["key"], "nvidia.com/gpu");
}

#[tokio::test]
async fn a_typed_allocation_pins_master_and_workers_of_a_pytorchjob() {
    let (client, log) = fake_api::client(|r| match (r.method.as_str(), r.path.as_str()) {
        ("POST", PYTORCHJOBS) => created(r),
        _ => status(404, "NotFound", "unexpected"),
    });
    // 8 GPUs for each of the master and 3 workers.
    let (w, _launched) = launch_with(client, typed_config(), 3, (8..40).collect()).await;
    drop(w.unwrap());
    let reqs = requests(&log);
    assert!(reqs[0].is("POST", PYTORCHJOBS));
    let specs = &reqs[0].body["spec"]["pytorchReplicaSpecs"];
    for role in ["Master", "Worker"] {
        assert_eq!(
            required_terms(&specs[role]["template"]["spec"]),
            &pinned_to("nvidia.com/gpu.product", &[H100]),
            "{role}"
        );
    }
}

#[test]
fn the_product_label_key_is_the_configured_one() {
    let cfg = KubernetesConfig {
        gpu_product_label: "gpu.example.com/product".into(),
        ..typed_config()
    };
    let v = body(&request_with(0, 2, vec![0, 1]), &cfg).unwrap();
    assert_eq!(
        required_terms(&v["spec"]["template"]["spec"]),
        &pinned_to("gpu.example.com/product", &[A100])
    );
}

#[test]
fn an_allocation_spanning_products_allows_each_of_them() {
    let v = body(&request_with(0, 4, vec![6, 7, 8, 9]), &typed_config()).unwrap();
    assert_eq!(
        required_terms(&v["spec"]["template"]["spec"]),
        &pinned_to("nvidia.com/gpu.product", &[A100, H100])
    );
}

#[test]
fn an_untyped_gpu_count_sets_no_affinity() {
    // `--gpus N`: the registered GPUs are stand-ins that name no node.
    let v = body(&request_with(0, 8, (0..8).collect()), &config()).unwrap();
    let spec = &v["spec"]["template"]["spec"];
    assert!(spec.get("affinity").is_none(), "{spec}");
    assert_eq!(
        spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"],
        "8"
    );

    let v = body(&request_with(2, 8, (0..24).collect()), &config()).unwrap();
    let specs = &v["spec"]["pytorchReplicaSpecs"];
    for role in ["Master", "Worker"] {
        assert!(specs[role]["template"]["spec"].get("affinity").is_none());
    }
}

#[test]
fn a_cpu_only_job_sets_no_affinity_on_a_typed_cluster() {
    let v = body(&request_with(0, 0, vec![]), &typed_config()).unwrap();
    let spec = &v["spec"]["template"]["spec"];
    assert!(spec.get("affinity").is_none(), "{spec}");
    assert!(spec["containers"][0]["resources"]["limits"]
        .get("nvidia.com/gpu")
        .is_none());
}

#[tokio::test]
async fn an_allocation_outside_the_declared_gpus_is_refused_before_any_call() {
    let (client, log) = fake_api::client(|_| status(500, "InternalError", "no call expected"));
    let (w, _launched) = launch_with(client, typed_config(), 0, vec![38, 39, 40]).await;
    let err = w.err().unwrap();
    assert!(
        matches!(err, crate::error::Error::UnknownGpu { index: 40 }),
        "{err}"
    );
    assert_eq!(err.to_job_error().category, "platform");
    assert!(requests(&log).is_empty());
}

#[test]
fn a_gpu_job_without_an_allocation_is_refused_on_a_typed_cluster() {
    // Unpinned, its pods could take GPUs of a type it did not ask for.
    let err = body(&request_with(0, 8, vec![]), &typed_config()).unwrap_err();
    assert!(
        matches!(err, crate::error::Error::InvalidAssignment(ref f) if f.field == "assignment.gpu_indexes"),
        "{err}"
    );
}
