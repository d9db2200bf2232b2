//! gRPC adapter: proto ⇄ domain, caller checks, errors → `Status`.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use trainmesh_common::auth;
use trainmesh_common::proto::diagnosis::v1 as dpb;

use crate::domain::{GetQuery, JobId, ListQuery};
use crate::prompt;
use crate::service::Diagnoser;

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
        // `use_llm` is accepted and has no effect until an LLM can be configured.
        let job_id = JobId::parse_field("job_id", &req.get_ref().job_id)?;
        let diagnosis = self.svc.diagnose(&caller, job_id).await?;
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
            templates: prompt::Prompts::builtin().to_proto(),
        }))
    }
}
