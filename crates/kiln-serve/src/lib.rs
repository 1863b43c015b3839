//! kiln's serving side: the generation engine (a scheduler thread with continuous batching
//! over a shared KV cache) and an OpenAI-compatible HTTP server on top of it.

pub mod api;
pub mod chat;
pub mod engine;
pub mod metrics;
pub mod server;
pub mod text;

pub use chat::{ChatMessage, ChatTemplate, TokenizerConfig};
pub use engine::{
    load_model, Completion, Engine, EngineConfig, FinishReason, GenEvent, GenRequest, ModelInfo, Sink, Usage,
};
pub use server::{serve, ServerConfig, ServerHandle};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Model(#[from] kiln_model::ModelError),
    #[error(transparent)]
    Data(#[from] kiln_data::DataError),
    #[error("{0}")]
    Load(String),
    /// A request no model run can serve (the caller's fault).
    #[error("{0}")]
    Invalid(String),
    #[error("the chat template failed: {0}")]
    Template(String),
    #[error(
        "this model's maximum context length is {context} tokens, but {} were requested \
         ({prompt} in the prompt, {max_tokens} for the completion); shorten the prompt or lower max_tokens",
        prompt + max_tokens
    )]
    ContextOverflow { context: usize, prompt: usize, max_tokens: usize },
    #[error("the request queue is full ({0} waiting); try again later")]
    QueueFull(usize),
    #[error("the engine has shut down")]
    ShutDown,
    #[error("generation failed: {0}")]
    Generation(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}
