//! gRPC adapter: proto ⇄ domain, caller checks, errors → `Status`.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};
use trainmesh_common::auth;
use trainmesh_common::proto::diagnosis::v1 as dpb;

use crate::domain::{GetQuery, JobId, ListQuery};
use crate::service::Diagnoser;

/// The caller's deadline from `grpc-timeout` (`<digits><unit>`, unit one of
/// H M S m u n), if it sent one that parses.
fn caller_timeout<T>(req: &Request<T>) -> Option<Duration> {
    let v = req.metadata().get("grpc-timeout")?.to_str().ok()?;
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[derive(Debug, Clone)]
pub struct DiagnosisGrpc {
    svc: Arc<Diagnoser>,
}

impl DiagnosisGrpc {
    pub fn new(svc: Arc<Diagnoser>) -> Self {
        Self { svc }
    }
}

#[tonic::async_trait]
impl dpb::diagnosis_service_server::DiagnosisService for DiagnosisGrpc {
    async fn diagnose_job(
        &self,
        req: Request<dpb::DiagnoseJobRequest>,
    ) -> Result<Response<dpb::DiagnoseJobResponse>, Status> {
        let caller = auth::caller(&req)?;
        let deadline = caller_timeout(&req).map(|t| tokio::time::Instant::now() + t);
        let job_id = JobId::parse_field("job_id", &req.get_ref().job_id)?;
        let use_llm = req.get_ref().use_llm;
        let diagnosis = self
            .svc
            .diagnose(&caller, job_id, use_llm, deadline)
            .await?;
        Ok(Response::new(dpb::DiagnoseJobResponse {
            diagnosis: Some(diagnosis),
        }))
    }

    async fn get_diagnosis(
        &self,
        req: Request<dpb::GetDiagnosisRequest>,
    ) -> Result<Response<dpb::GetDiagnosisResponse>, Status> {
        let caller = auth::caller(&req)?;
        let q = GetQuery::try_from(req.into_inner())?;
        let diagnosis = self.svc.get(&caller, q).await?;
        Ok(Response::new(dpb::GetDiagnosisResponse {
            diagnosis: Some(diagnosis),
        }))
    }

    async fn list_diagnoses(
        &self,
        req: Request<dpb::ListDiagnosesRequest>,
    ) -> Result<Response<dpb::ListDiagnosesResponse>, Status> {
        let caller = auth::caller(&req)?;
        let q = ListQuery::try_from(req.into_inner())?;
        let (diagnoses, next) = self.svc.list(&caller, q).await?;
        Ok(Response::new(dpb::ListDiagnosesResponse {
            diagnoses,
            next_page_token: next.unwrap_or_default(),
        }))
    }

    async fn list_prompt_templates(
        &self,
        req: Request<dpb::ListPromptTemplatesRequest>,
    ) -> Result<Response<dpb::ListPromptTemplatesResponse>, Status> {
        auth::caller(&req)?;
        Ok(Response::new(dpb::ListPromptTemplatesResponse {
            templates: self.svc.prompts().to_proto(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeout(v: &str) -> Option<Duration> {
        let mut r = Request::new(());
        r.metadata_mut().insert("grpc-timeout", v.parse().unwrap());
        caller_timeout(&r)
    }

    #[test]
    fn grpc_timeouts_parse_in_every_unit() {
        assert_eq!(timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(timeout("2500m"), Some(Duration::from_millis(2500)));
        assert_eq!(timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(timeout("5M"), Some(Duration::from_secs(300)));
        assert_eq!(timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(timeout("9n"), Some(Duration::from_nanos(9)));
        for bad in ["", "S", "12", "1x", "-1S", "123456789S"] {
            assert_eq!(timeout(bad), None, "{bad}");
        }
        assert_eq!(caller_timeout(&Request::new(())), None);
    }
}
