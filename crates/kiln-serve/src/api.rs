//! OpenAI API request bodies (the fields kiln reads; unknown fields are ignored, as OpenAI
//! clients send many) and the checks that turn them into engine requests.

use serde::Deserialize;

use crate::chat::ChatMessage;
use kiln_model::SamplingParams;

/// `prompt`: a string, a list with one string, or token ids.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

/// `stop`: one string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// The sampling and length fields both endpoints share.
#[derive(Debug, Default, Deserialize)]
pub struct Common {
    pub model: Option<String>,
    pub max_tokens: Option<u64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// Not in OpenAI's API; vLLM and llama.cpp accept it.
    pub top_k: Option<i64>,
    pub repetition_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub n: Option<u64>,
    pub seed: Option<i64>,
    pub stop: Option<Stop>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub logprobs: Option<serde_json::Value>,
    pub top_logprobs: Option<serde_json::Value>,
    pub echo: Option<bool>,
    pub best_of: Option<u64>,
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub prompt: Option<Prompt>,
    #[serde(flatten)]
    pub common: Common,
}

/// A message's content: a string, or a list of parts of which the text parts are read.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct RawMessage {
    pub role: String,
    pub content: Option<Content>,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<RawMessage>,
    /// The newer name for max_tokens.
    pub max_completion_tokens: Option<u64>,
    #[serde(flatten)]
    pub common: Common,
}

/// At most this many stop sequences, as OpenAI allows.
pub const MAX_STOPS: usize = 4;

impl Common {
    /// Sampling parameters with OpenAI's ranges checked.
    pub fn sampling(&self) -> Result<SamplingParams, String> {
        let mut p = SamplingParams::default();
        if let Some(t) = self.temperature {
            if !(0.0..=2.0).contains(&t) {
                return Err(format!("temperature must be between 0 and 2, got {t}"));
            }
            p.temperature = t;
        }
        if let Some(x) = self.top_p {
            p.top_p = x;
        }
        if let Some(k) = self.top_k {
            // -1 means "no cut" in vLLM.
            p.top_k = if k < 0 { 0 } else { k as usize };
        }
        if let Some(x) = self.repetition_penalty {
            p.repetition_penalty = x;
        }
        for (name, v, slot) in [
            ("frequency_penalty", self.frequency_penalty, &mut p.frequency_penalty),
            ("presence_penalty", self.presence_penalty, &mut p.presence_penalty),
        ] {
            if let Some(x) = v {
                if !(-2.0..=2.0).contains(&x) {
                    return Err(format!("{name} must be between -2 and 2, got {x}"));
                }
                *slot = x;
            }
        }
        p.validate()?;
        Ok(p)
    }

    /// Refuses options kiln does not implement rather than silently ignoring them.
    pub fn unsupported(&self) -> Result<(), String> {
        if self.n.is_some_and(|n| n != 1) || self.best_of.is_some_and(|n| n != 1) {
            return Err("only n = 1 (and best_of = 1) is supported".into());
        }
        let on = |v: &Option<serde_json::Value>| {
            v.as_ref().is_some_and(|x| !(x.is_null() || x == &serde_json::json!(false) || x == &serde_json::json!(0)))
        };
        if on(&self.logprobs) || on(&self.top_logprobs) {
            return Err("logprobs are not supported".into());
        }
        if self.echo == Some(true) {
            return Err("echo is not supported".into());
        }
        Ok(())
    }

    pub fn stops(&self) -> Result<Vec<String>, String> {
        let stops = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stops.len() > MAX_STOPS {
            return Err(format!("at most {MAX_STOPS} stop sequences are allowed, got {}", stops.len()));
        }
        Ok(stops.into_iter().filter(|s| !s.is_empty()).collect())
    }
}

impl ChatRequest {
    /// The messages with their text parts joined.
    pub fn messages(&self) -> Result<Vec<ChatMessage>, String> {
        if self.messages.is_empty() {
            return Err("messages must not be empty".into());
        }
        self.messages
            .iter()
            .map(|m| {
                let content = match &m.content {
                    None => String::new(),
                    Some(Content::Text(t)) => t.clone(),
                    Some(Content::Parts(parts)) => {
                        if let Some(p) = parts.iter().find(|p| p.kind != "text") {
                            return Err(format!("content parts of type '{}' are not supported (text only)", p.kind));
                        }
                        parts.iter().filter_map(|p| p.text.as_deref()).collect::<Vec<_>>().join("")
                    }
                };
                Ok(ChatMessage { role: m.role.clone(), content })
            })
            .collect()
    }
}
