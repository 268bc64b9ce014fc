//! The app's own web pages ([`App::page`](crate::App::page)): what a handler is given and
//! what it answers.

use serde::Serialize;

/// A `GET` of one of the app's pages.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct WebRequest {
    /// The path, percent-decoded (`/hello`).
    pub path: String,
    /// The query parameters, percent-decoded, in order.
    pub query: Vec<(String, String)>,
}

impl WebRequest {
    /// A request for `path` with these query parameters.
    pub fn new(path: impl Into<String>, query: Vec<(String, String)>) -> WebRequest {
        WebRequest { path: path.into(), query }
    }

    /// The first value of the query parameter `name`.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// What a page answers.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct WebResponse {
    /// The HTTP status.
    pub status: u16,
    /// The `Content-Type`.
    pub content_type: String,
    /// The body.
    pub body: Vec<u8>,
}

impl WebResponse {
    /// `value` as JSON, with `status`.
    ///
    /// ```
    /// let r = faust::WebResponse::json(200, &serde_json::json!({ "ok": true }));
    /// assert_eq!(r.body, br#"{"ok":true}"#);
    /// ```
    pub fn json<T: Serialize + ?Sized>(status: u16, value: &T) -> WebResponse {
        match serde_json::to_vec(value) {
            Ok(body) => WebResponse { status, content_type: "application/json".into(), body },
            Err(e) => WebResponse::text(500, &format!("the page's answer does not encode as JSON: {e}")),
        }
    }

    /// Plain text, with `status`.
    pub fn text(status: u16, text: &str) -> WebResponse {
        WebResponse { status, content_type: "text/plain; charset=utf-8".into(), body: text.as_bytes().to_vec() }
    }

    /// HTML, with `status`.
    pub fn html(status: u16, html: &str) -> WebResponse {
        WebResponse { status, content_type: "text/html; charset=utf-8".into(), body: html.as_bytes().to_vec() }
    }
}
