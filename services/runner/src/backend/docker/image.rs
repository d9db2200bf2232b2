//! Making sure the job's image is on the node, by the pull policy.

use bollard::query_parameters::CreateImageOptions;
use bollard::Docker;
use futures::StreamExt;

use super::errors;
use crate::config::PullPolicy;
use crate::error::Error;

/// Pulls `image` (a reference with its tag) when `policy` says so.
pub async fn ensure_image(docker: &Docker, image: &str, policy: PullPolicy) -> Result<(), Error> {
    let present = match docker.inspect_image(image).await {
        Ok(_) => true,
        Err(e) if errors::is_not_found(&e) => false,
        Err(e) => return Err(Error::docker(format!("inspecting image `{image}`"), e)),
    };
    match (policy, present) {
        (PullPolicy::IfNotPresent, true) => Ok(()),
        (PullPolicy::Never, true) => Ok(()),
        (PullPolicy::Never, false) => Err(Error::ImagePull {
            image: image.to_owned(),
            reason: "it is not on this node and the runner's pull policy is never".into(),
            transient: false,
        }),
        (PullPolicy::Always, _) | (PullPolicy::IfNotPresent, false) => pull(docker, image).await,
    }
}

async fn pull(docker: &Docker, image: &str) -> Result<(), Error> {
    tracing::info!(image, "pulling image");
    let options = CreateImageOptions {
        from_image: Some(image.to_owned()),
        ..CreateImageOptions::default()
    };
    let mut progress = docker.create_image(Some(options), None, None);
    while let Some(item) = progress.next().await {
        if let Err(e) = item {
            tracing::warn!(image, error = %e, "image pull failed");
            return Err(errors::pull_failure(image, &e));
        }
    }
    tracing::info!(image, "image pulled");
    Ok(())
}
