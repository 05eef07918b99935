//! Metrics of every Kubernetes API call, as a layer of the kube client's tower stack.

use super::metrics::{KubeLabels, KubeOperationLabels, Metrics};
use futures::future::BoxFuture;
use http::{Method, Request, Response, Uri};
use std::{
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

/// Counts and times each call by verb, resource and status code.
#[derive(Clone)]
pub struct KubeMetricsLayer(pub Arc<Metrics>);

impl<S> tower::Layer<S> for KubeMetricsLayer {
    type Service = KubeMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        KubeMetricsService { inner, metrics: self.0.clone() }
    }
}

#[derive(Clone)]
pub struct KubeMetricsService<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, B, R> tower::Service<Request<B>> for KubeMetricsService<S>
where
    S: tower::Service<Request<B>, Response = Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let (verb, resource) = classify(request.method(), request.uri());
        let metrics = self.metrics.clone();
        let started = Instant::now();
        let call = self.inner.call(request);
        Box::pin(async move {
            let result = call.await;
            let code = match &result {
                Ok(response) => status_label(response.status().as_u16()),
                Err(_) => "error",
            };
            metrics.kube_client.requests.get_or_create(&KubeLabels { verb, resource, code }).inc();
            if verb != "watch" {
                let labels = KubeOperationLabels { verb, resource };
                metrics.kube_client.duration.get_or_create(&labels).observe(started.elapsed().as_secs_f64());
            }
            result
        })
    }
}

/// The verb and resource of an API path such as `/apis/batch/v1/namespaces/oats/jobs/job-x`.
pub fn classify(method: &Method, uri: &Uri) -> (&'static str, &'static str) {
    let segments: Vec<&str> = uri.path().trim_matches('/').split('/').collect();
    // `…/namespaces/{namespace}/{resource}[/{name}[/{subresource}]]`
    let rest = segments.iter().position(|s| *s == "namespaces").and_then(|i| segments.get(i + 2..)).unwrap_or(&[]);
    let resource = match (rest.first().copied(), rest.get(2).copied()) {
        (Some("pods"), Some("log")) => "pods/log",
        (Some("jobs"), _) => "jobs",
        (Some("pods"), _) => "pods",
        (Some("events"), _) => "events",
        (Some("leases"), _) => "leases",
        _ if segments.last() == Some(&"version") => "version",
        _ => "other",
    };
    let named = rest.len() >= 2;
    let watch = uri.query().is_some_and(|q| q.split('&').any(|p| p == "watch=true"));
    let verb = match *method {
        Method::GET if named => "get",
        Method::GET if watch => "watch",
        Method::GET => "list",
        Method::POST => "create",
        Method::PATCH => "patch",
        Method::PUT => "update",
        Method::DELETE => "delete",
        _ => "other",
    };
    (verb, resource)
}

fn status_label(code: u16) -> &'static str {
    match code {
        200..=299 => match code {
            200 => "200",
            201 => "201",
            _ => "2xx",
        },
        300..=399 => "3xx",
        400..=499 => match code {
            400 => "400",
            401 => "401",
            403 => "403",
            404 => "404",
            409 => "409",
            410 => "410",
            422 => "422",
            429 => "429",
            _ => "4xx",
        },
        _ => match code {
            500 => "500",
            503 => "503",
            504 => "504",
            _ => "5xx",
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_the_calls_oats_makes() {
        let cases = [
            (Method::POST, "/apis/batch/v1/namespaces/oats/jobs?", ("create", "jobs")),
            (Method::GET, "/apis/batch/v1/namespaces/oats/jobs?&labelSelector=app%3Doats-agent", ("list", "jobs")),
            (Method::GET, "/apis/batch/v1/namespaces/oats/jobs?&watch=true&timeoutSeconds=290", ("watch", "jobs")),
            (Method::GET, "/apis/batch/v1/namespaces/oats/jobs/job-x", ("get", "jobs")),
            (Method::PATCH, "/apis/batch/v1/namespaces/oats/jobs/job-x?", ("patch", "jobs")),
            (Method::GET, "/api/v1/namespaces/oats/pods/job-x-abc/log?container=agent", ("get", "pods/log")),
            (Method::GET, "/api/v1/namespaces/oats/events?fieldSelector=x", ("list", "events")),
            (Method::GET, "/version", ("list", "version")),
        ];
        for (method, uri, expected) in cases {
            assert_eq!(classify(&method, &uri.parse().unwrap()), expected, "{uri}");
        }
    }
}
