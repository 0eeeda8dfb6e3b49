//! The embedded web client: served at `/` with a strict Content-Security-
//! Policy, the right content types and revalidated caching; off with
//! `web.enabled = false`. (The client itself runs in a real browser in
//! tests/browser.)

use std::collections::HashMap;

use reqwest::StatusCode;
use reqwest::header::{self, HeaderMap};
use shindensen::config::Settings;

use crate::helpers::TestApp;

const FILES: [(&str, &str); 3] = [
    ("/", "text/html; charset=utf-8"),
    ("/app.js", "text/javascript; charset=utf-8"),
    ("/style.css", "text/css; charset=utf-8"),
];

async fn fetch(app: &TestApp, path: &str) -> (StatusCode, HeaderMap, String) {
    let res = app.http.get(app.url(path)).send().await.expect("request");
    let status = res.status();
    let headers = res.headers().clone();
    (status, headers, res.text().await.expect("body"))
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header"))
        .to_str()
        .expect("ASCII header")
}

#[tokio::test]
async fn the_client_is_served_with_its_content_types() {
    let app = TestApp::spawn().await;
    for (path, content_type) in FILES {
        let (status, headers, body) = fetch(&app, path).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        assert_eq!(header(&headers, "content-type"), content_type, "{path}");
        assert!(!body.is_empty(), "{path}");
    }
    let (_, _, index) = fetch(&app, "/").await;
    assert!(index.contains(r#"<script type="module" src="/app.js"></script>"#));
    assert!(index.contains(r#"<link rel="stylesheet" href="/style.css">"#));
    // HEAD works too (load balancers, curl -I).
    let res = app.http.head(app.url("/")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
}

#[tokio::test]
async fn every_file_has_a_csp_without_unsafe_inline_and_no_third_party_origins() {
    let app = TestApp::spawn().await;
    for (path, _) in FILES {
        let (_, headers, _) = fetch(&app, path).await;
        let csp = header(&headers, "content-security-policy");
        let directives: HashMap<&str, &str> = csp
            .split(';')
            .filter_map(|d| d.trim().split_once(' '))
            .collect();
        assert_eq!(directives["default-src"], "'self'", "{csp}");
        assert_eq!(directives["script-src"], "'self'", "{csp}");
        assert_eq!(directives["style-src"], "'self'", "{csp}");
        assert_eq!(directives["connect-src"], "'self' ws: wss:", "{csp}");
        assert_eq!(directives["object-src"], "'none'", "{csp}");
        assert_eq!(directives["base-uri"], "'none'", "{csp}");
        assert_eq!(directives["frame-ancestors"], "'none'", "{csp}");
        assert!(!csp.contains("unsafe-inline"), "{csp}");
        assert!(!csp.contains("unsafe-eval"), "{csp}");
        assert!(!csp.contains("http"), "no third-party origin: {csp}");
        assert_eq!(header(&headers, "x-content-type-options"), "nosniff");
        assert_eq!(header(&headers, "referrer-policy"), "no-referrer");
    }
}

#[tokio::test]
async fn the_page_has_no_inline_script_or_style_and_the_script_no_html_sinks() {
    // The CSP would block them; this says so before a browser does.
    let app = TestApp::spawn().await;
    let (_, _, index) = fetch(&app, "/").await;
    assert!(!index.contains("<script>"), "inline script");
    assert!(!index.contains("<style"), "inline style element");
    assert!(!index.contains("style=\""), "inline style attribute");
    assert!(!has_event_handler_attribute(&index), "inline event handler");
    let (_, _, js) = fetch(&app, "/app.js").await;
    for sink in [
        ".innerHTML =",
        ".outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "eval(",
    ] {
        assert!(!js.contains(sink), "{sink} in app.js");
    }
}

/// ` onclick=`, ` onload="…"` and the like.
fn has_event_handler_attribute(html: &str) -> bool {
    html.match_indices(" on").any(|(i, _)| {
        let rest = &html[i + 3..];
        let name_len = rest.bytes().take_while(|b| b.is_ascii_lowercase()).count();
        name_len > 0 && rest[name_len..].trim_start().starts_with('=')
    })
}

#[tokio::test]
async fn files_are_revalidated_with_an_etag() {
    let app = TestApp::spawn().await;
    for (path, _) in FILES {
        let (_, headers, _) = fetch(&app, path).await;
        assert_eq!(header(&headers, "cache-control"), "no-cache", "{path}");
        let etag = header(&headers, "etag").to_string();
        assert!(etag.starts_with('"') && etag.ends_with('"'), "{etag}");

        let res = app
            .http
            .get(app.url(path))
            .header(header::IF_NONE_MATCH, &etag)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::NOT_MODIFIED, "{path}");
        assert_eq!(header(res.headers(), "etag"), etag);
        assert!(res.bytes().await.unwrap().is_empty());

        let res = app
            .http
            .get(app.url(path))
            .header(header::IF_NONE_MATCH, "\"something-else\"")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{path}");
    }
    // Different files, different tags.
    let (_, a, _) = fetch(&app, "/app.js").await;
    let (_, b, _) = fetch(&app, "/style.css").await;
    assert_ne!(header(&a, "etag"), header(&b, "etag"));
}

#[tokio::test]
async fn disabled_client_answers_the_json_404_and_the_api_still_works() {
    let app = TestApp::spawn_with(|s| s.web.enabled = false).await;
    for (path, _) in FILES {
        let (status, body) = app.get(path, None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(body["code"], "not_found", "{path}");
    }
    let (status, _) = app.get("/healthz", None).await;
    assert_eq!(status, StatusCode::OK);
}

#[test]
fn web_enabled_is_on_by_default_and_off_by_environment() {
    let env = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    assert!(Settings::load_from(None, &env(&[])).unwrap().web.enabled);
    let off = Settings::load_from(None, &env(&[("SHINDENSEN_WEB__ENABLED", "false")])).unwrap();
    assert!(!off.web.enabled);
    assert!(off.redacted_toml().contains("[web]\nenabled = false"));
}
