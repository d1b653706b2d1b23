//! The router as a client sees it: routes, methods, status codes and content types.

use axum::body::{Body, to_bytes};
use axum::http::{Method, Request, StatusCode, header};
use tower::ServiceExt;

use super::*;

fn state() -> StatusState {
    let (_, desired) = watch::channel(Default::default());
    StatusState {
        desired,
        board: Default::default(),
        clusters: Default::default(),
        daemon: Default::default(),
    }
}

/// (status, content type, body)
async fn call(state: &StatusState, method: Method, path: &str) -> (StatusCode, String, String) {
    let request = Request::builder()
        .method(method)
        .uri(path)
        .body(Body::empty())
        .unwrap();
    let response = router(state.clone()).oneshot(request).await.unwrap();
    let status = response.status();
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let body = to_bytes(response.into_body(), usize::MAX).await.unwrap();
    (
        status,
        content_type,
        String::from_utf8(body.to_vec()).unwrap(),
    )
}

#[tokio::test]
async fn every_route_answers_get_and_refuses_changes() {
    let state = state();
    for path in ["/", "/healthz", "/readyz", "/metrics", "/api/v1/status"] {
        for method in [Method::POST, Method::PUT, Method::DELETE, Method::PATCH] {
            let (status, _, _) = call(&state, method.clone(), path).await;
            assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        }
    }
    let (status, content_type, body) = call(&state, Method::GET, "/").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(content_type, "text/html; charset=utf-8");
    assert!(body.starts_with("<!doctype html>"));
    let (_, content_type, body) = call(&state, Method::GET, "/metrics").await;
    assert_eq!(content_type, metrics::CONTENT_TYPE);
    assert!(body.ends_with("# EOF\n"), "{body}");
    assert_eq!(call(&state, Method::GET, "/healthz").await.2, "ok\n");
}

#[tokio::test]
async fn readyz_is_503_until_the_clusters_are_set_up() {
    let state = state();
    let (status, content_type, body) = call(&state, Method::GET, "/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(content_type.starts_with("text/plain"));
    assert!(
        body.contains("not ready  clusters: still being set up"),
        "{body}"
    );

    state.daemon.clusters_started();
    let (status, _, body) = call(&state, Method::GET, "/readyz").await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn reloads_are_counted_by_result() {
    let state = state();
    state.daemon.reloaded(true);
    state.daemon.reloaded(true);
    state.daemon.reloaded(false);
    let (_, _, body) = call(&state, Method::GET, "/metrics").await;
    assert!(body.contains("endpoints_operator_config_reloads_total{result=\"success\"} 2\n"));
    assert!(body.contains("endpoints_operator_config_reloads_total{result=\"failure\"} 1\n"));
    let json = call(&state, Method::GET, "/api/v1/status").await.2;
    assert!(
        json.contains(r#""configReloads":{"succeeded":2,"failed":1}"#),
        "{json}"
    );
}
