//! The OpenAI-compatible HTTP server (axum on a small tokio runtime of its own). Handlers only
//! parse, tokenize and forward: all model work happens on the engine's scheduler thread, and
//! its events come back over channels.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::api::{ChatRequest, Common, CompletionRequest, Prompt};
use crate::engine::{Engine, GenEvent, GenRequest, Usage};
use crate::metrics::Metrics;
use crate::ServeError;

/// Limits and options of the HTTP side.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Clients must send `Authorization: Bearer KEY` to /v1/* when set.
    pub api_key: Option<String>,
    /// Largest request body accepted (413 beyond).
    pub max_body_bytes: usize,
    /// Largest max_tokens a request may ask for (400 beyond); also the default for chat.
    pub max_tokens_limit: usize,
    /// Longest prompt in tokens (400 beyond); the model's context is the limit in any case.
    pub max_prompt_tokens: Option<usize>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig { api_key: None, max_body_bytes: 1 << 20, max_tokens_limit: 4096, max_prompt_tokens: None }
    }
}

struct AppState {
    engine: Arc<Engine>,
    cfg: ServerConfig,
    metrics: Metrics,
    next_id: AtomicU64,
    started: u64,
}

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
struct ApiError {
    status: StatusCode,
    message: String,
    code: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError { status, message: message.into(), code: None }
    }
    fn bad(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
    fn code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }
    fn body(&self) -> Value {
        let kind = match self.status.as_u16() {
            401 => "authentication_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            500..=599 => "server_error",
            _ => "invalid_request_error",
        };
        json!({"error": {"message": self.message, "type": kind, "param": null, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

impl From<ServeError> for ApiError {
    fn from(e: ServeError) -> ApiError {
        let status = match &e {
            ServeError::Invalid(_) | ServeError::Template(_) | ServeError::Data(_) => StatusCode::BAD_REQUEST,
            ServeError::ContextOverflow { .. } => return ApiError::bad(e.to_string()).code("context_length_exceeded"),
            ServeError::QueueFull(_) => StatusCode::TOO_MANY_REQUESTS,
            ServeError::ShutDown => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    }
}

/// A running server; [`ServerHandle::shutdown`] stops it (waiting for open responses).
pub struct ServerHandle {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<(), ServeError>>>,
}

impl ServerHandle {
    /// The address it listens on (the real port when bound to port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Blocks until the server stops; returns its error if it failed.
    pub fn wait(mut self) -> Result<(), ServeError> {
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(ServeError::Generation("the server thread panicked".into())),
            None => Ok(()),
        }
    }

    pub fn shutdown(mut self) -> Result<(), ServeError> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.wait()
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// Serves `engine` on `listener` from a background thread with its own tokio runtime
/// (`http_threads` workers: they only parse and forward).
pub fn serve(
    engine: Arc<Engine>,
    cfg: ServerConfig,
    listener: std::net::TcpListener,
    http_threads: usize,
) -> Result<ServerHandle, ServeError> {
    let addr = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(http_threads.max(1))
        .thread_name("kiln-http")
        .enable_io()
        .enable_time()
        .build()?;
    let state = Arc::new(AppState {
        engine,
        cfg: cfg.clone(),
        metrics: Metrics::default(),
        next_id: AtomicU64::new(0),
        started: unix_now(),
    });
    let app = router(state, cfg.max_body_bytes);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new().name("kiln-http-main".into()).spawn(move || {
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener)?;
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stop_rx.await;
                })
                .await?;
            Ok::<(), ServeError>(())
        })
    })?;
    Ok(ServerHandle { addr, stop: Some(stop_tx), thread: Some(thread) })
}

fn router(state: Arc<AppState>, max_body: usize) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

async fn not_found() -> Response {
    ApiError::new(StatusCode::NOT_FOUND, "no such endpoint (see /v1/completions, /v1/chat/completions, /v1/models)")
        .into_response()
}

async fn health(State(st): State<Arc<AppState>>) -> Response {
    st.metrics.request("/health", 200);
    Json(json!({"status": "ok", "queue_depth": st.engine.queue_depth(), "active": st.engine.active()})).into_response()
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    st.metrics.request("/metrics", 200);
    let e = &st.engine;
    let text = st.metrics.render(e.queue_depth(), e.active(), e.max_batch());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

async fn models(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let resp = match st.authorize(&headers) {
        Err(e) => e.into_response(),
        Ok(()) => {
            let info = st.engine.info();
            Json(json!({"object": "list", "data": [{
                "id": info.name, "object": "model", "created": st.started, "owned_by": "kiln",
                "max_model_len": info.context_len, "model_type": info.model_type,
            }]}))
            .into_response()
        }
    };
    st.metrics.request("/v1/models", resp.status().as_u16());
    resp
}

async fn completions(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let resp = st.clone().generate(Kind::Completion, &headers, body).await.unwrap_or_else(|e| e.into_response());
    st.metrics.request("/v1/completions", resp.status().as_u16());
    resp
}

async fn chat_completions(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let resp = st.clone().generate(Kind::Chat, &headers, body).await.unwrap_or_else(|e| e.into_response());
    st.metrics.request("/v1/chat/completions", resp.status().as_u16());
    resp
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Completion,
    Chat,
}

/// What a response needs to know about its request.
struct Job {
    kind: Kind,
    id: String,
    model: String,
    created: u64,
    include_usage: bool,
    arrived: Instant,
}

impl Job {
    fn chunk(&self, text: Option<&str>, finish: Option<&str>, first: bool) -> Value {
        match self.kind {
            Kind::Completion => json!({
                "id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish}],
            }),
            Kind::Chat => {
                let mut delta = json!({});
                if first {
                    delta["role"] = json!("assistant");
                }
                if let Some(t) = text {
                    delta["content"] = json!(t);
                }
                json!({
                    "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
                })
            }
        }
    }

    fn usage(u: Usage) -> Value {
        json!({"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
               "total_tokens": u.prompt_tokens + u.completion_tokens})
    }

    fn whole(&self, text: &str, finish: &str, usage: Usage) -> Value {
        let choice = match self.kind {
            Kind::Completion => json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish}),
            Kind::Chat => json!({"index": 0, "message": {"role": "assistant", "content": text},
                                 "logprobs": null, "finish_reason": finish}),
        };
        let object = if self.kind == Kind::Chat { "chat.completion" } else { "text_completion" };
        json!({"id": self.id, "object": object, "created": self.created, "model": self.model,
               "choices": [choice], "usage": Job::usage(usage)})
    }
}

impl AppState {
    fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(key) = &self.cfg.api_key else { return Ok(()) };
        let given =
            headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        if given.map(str::trim) == Some(key.as_str()) {
            Ok(())
        } else {
            Err(ApiError::new(StatusCode::UNAUTHORIZED, "missing or wrong API key (send Authorization: Bearer KEY)")
                .code("invalid_api_key"))
        }
    }

    /// Parses, checks and queues a request, then answers with the whole text or an SSE stream.
    async fn generate(
        self: Arc<Self>,
        kind: Kind,
        headers: &HeaderMap,
        body: Result<Bytes, BytesRejection>,
    ) -> Result<Response, ApiError> {
        let arrived = Instant::now();
        self.authorize(headers)?;
        let body = body.map_err(|r| {
            if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("the request body is larger than {} bytes", self.cfg.max_body_bytes),
                )
            } else {
                ApiError::bad(format!("cannot read the request body: {r}"))
            }
        })?;
        let info = self.engine.info().clone();
        let bad_json = |e: serde_json::Error| ApiError::bad(format!("invalid JSON body: {e}"));
        let (prompt, common, mut stop, default_max) = match kind {
            Kind::Completion => {
                let r: CompletionRequest = serde_json::from_slice(&body).map_err(bad_json)?;
                let prompt = match r.prompt {
                    None => return Err(ApiError::bad("'prompt' is required")),
                    Some(Prompt::Text(t)) => info.encode_prompt(&t)?,
                    Some(Prompt::Texts(v)) if v.len() == 1 => info.encode_prompt(&v[0])?,
                    Some(Prompt::Tokens(ids)) => ids,
                    Some(Prompt::TokenLists(mut v)) if v.len() == 1 => v.remove(0),
                    Some(_) => return Err(ApiError::bad("only one prompt per request is supported")),
                };
                // OpenAI's default for completions.
                (prompt, r.common, Vec::new(), 16)
            }
            Kind::Chat => {
                let mut r: ChatRequest = serde_json::from_slice(&body).map_err(bad_json)?;
                let messages = r.messages().map_err(ApiError::bad)?;
                let prompt = info.encode_chat(&messages)?;
                if r.common.max_tokens.is_none() {
                    r.common.max_tokens = r.max_completion_tokens;
                }
                // Chat replies run to the end of the context unless limited.
                let room = info.context_len.saturating_sub(prompt.len()).clamp(1, self.cfg.max_tokens_limit);
                (prompt, r.common, info.chat_stops(), room)
            }
        };
        self.check_model(&common)?;
        common.unsupported().map_err(ApiError::bad)?;
        let params = common.sampling().map_err(ApiError::bad)?;
        stop.extend(common.stops().map_err(ApiError::bad)?);
        let limit = self.cfg.max_prompt_tokens.unwrap_or(info.context_len);
        if prompt.len() > limit {
            return Err(ApiError::bad(format!("the prompt is {} tokens long; the limit is {limit}", prompt.len()))
                .code("context_length_exceeded"));
        }
        let max_tokens = match common.max_tokens {
            None => default_max,
            Some(m) if m > self.cfg.max_tokens_limit as u64 => {
                return Err(ApiError::bad(format!(
                    "max_tokens is {m}; this server allows at most {}",
                    self.cfg.max_tokens_limit
                )))
            }
            Some(m) => m as usize,
        };
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        // Without a seed, sampling differs between requests, as with OpenAI.
        let seed =
            common.seed.map_or_else(|| n ^ (arrived.elapsed().as_nanos() as u64) ^ (unix_now() << 20), |s| s as u64);
        let req = GenRequest { prompt, max_tokens, params, seed, stop, context_shift: false };
        let (tx, rx) = mpsc::unbounded_channel();
        self.engine.submit(req, Box::new(move |ev| tx.send(ev).is_ok()))?;
        let job = Job {
            kind,
            id: format!("{}-{n}", if kind == Kind::Chat { "chatcmpl" } else { "cmpl" }),
            model: info.name.clone(),
            created: unix_now(),
            include_usage: common.stream_options.as_ref().is_some_and(|o| o.include_usage),
            arrived,
        };
        if common.stream == Some(true) {
            Ok(self.stream(job, rx))
        } else {
            self.whole(job, rx).await
        }
    }

    fn check_model(&self, c: &Common) -> Result<(), ApiError> {
        let name = &self.engine.info().name;
        match c.model.as_deref() {
            Some(m) if !m.is_empty() && m != name => Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("the model '{m}' does not exist; this server serves '{name}'"),
            )
            .code("model_not_found")),
            _ => Ok(()),
        }
    }

    async fn whole(&self, job: Job, mut rx: mpsc::UnboundedReceiver<GenEvent>) -> Result<Response, ApiError> {
        let mut text = String::new();
        while let Some(ev) = rx.recv().await {
            match ev {
                GenEvent::Text(t) => text += &t,
                GenEvent::Done { reason, usage } => {
                    self.metrics.generation(
                        usage.prompt_tokens,
                        usage.completion_tokens,
                        job.arrived.elapsed().as_secs_f64(),
                    );
                    return Ok(Json(job.whole(&text, reason.as_str(), usage)).into_response());
                }
                GenEvent::Error(e) => return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e)),
            }
        }
        Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the engine stopped before finishing"))
    }

    /// Forwards engine events as OpenAI stream chunks; a dropped client closes the channel,
    /// which cancels the sequence at its next token.
    fn stream(self: Arc<Self>, job: Job, mut rx: mpsc::UnboundedReceiver<GenEvent>) -> Response {
        let (tx, out) = mpsc::unbounded_channel::<Result<Event, Infallible>>();
        tokio::spawn(async move {
            let send = |v: &Value| tx.send(Ok(Event::default().data(v.to_string()))).is_ok();
            if job.kind == Kind::Chat && !send(&job.chunk(Some(""), None, true)) {
                return;
            }
            while let Some(ev) = rx.recv().await {
                match ev {
                    GenEvent::Text(t) => {
                        if !send(&job.chunk(Some(&t), None, false)) {
                            return;
                        }
                    }
                    GenEvent::Done { reason, usage } => {
                        self.metrics.generation(
                            usage.prompt_tokens,
                            usage.completion_tokens,
                            job.arrived.elapsed().as_secs_f64(),
                        );
                        send(&job.chunk(None, Some(reason.as_str()), false));
                        if job.include_usage {
                            let mut last = job.chunk(None, None, false);
                            last["choices"] = json!([]);
                            last["usage"] = Job::usage(usage);
                            send(&last);
                        }
                        break;
                    }
                    GenEvent::Error(e) => {
                        send(&ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e).body());
                        break;
                    }
                }
            }
            let _ = tx.send(Ok(Event::default().data("[DONE]")));
        });
        Sse::new(UnboundedReceiverStream::new(out)).into_response()
    }
}
