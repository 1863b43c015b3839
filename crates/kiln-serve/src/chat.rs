//! Chat prompts: the Jinja chat template of tokenizer_config.json rendered the way Hugging Face
//! `apply_chat_template` does, or a plain fallback when a checkpoint has none.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::ServeError;

/// One chat turn.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// The fallback template: "Role: content" lines, then "Assistant:" to prompt a reply.
pub const PLAIN_TEMPLATE: &str = "{% for m in messages %}{{ m.role | capitalize }}: {{ m.content }}\n{% endfor %}\
{% if add_generation_prompt %}Assistant:{% endif %}";

/// Stop text that ends a reply under the plain template (the model starting the next turn).
pub const PLAIN_STOPS: [&str; 2] = ["\nUser:", "\nSystem:"];

/// What tokenizer_config.json says about special tokens and chat.
#[derive(Clone, Debug, Default)]
pub struct TokenizerConfig {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// Whether a BOS token starts every encoded text (Llama: true; GPT-2: false).
    pub add_bos_token: bool,
    pub chat_template: Option<String>,
    /// `added_tokens_decoder`: id and text of each special token.
    pub added_tokens: Vec<(u32, String)>,
}

impl TokenizerConfig {
    /// Reads `dir/tokenizer_config.json`; a missing file is an empty config.
    pub fn read(dir: &Path) -> Result<TokenizerConfig, ServeError> {
        let path = dir.join("tokenizer_config.json");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(TokenizerConfig::default()),
            Err(e) => return Err(ServeError::Load(format!("{}: cannot read: {e}", path.display()))),
        };
        Self::parse(&text).map_err(|e| ServeError::Load(format!("{}: {e}", path.display())))
    }

    pub fn parse(text: &str) -> Result<TokenizerConfig, String> {
        let v: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
        // A token is a string or an AddedToken object {"content": ...}.
        let token = |key: &str| -> Option<String> {
            match v.get(key)? {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
                _ => None,
            }
        };
        // chat_template is a string, or a list of {name, template} with a "default" entry.
        let chat_template = match v.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .or_else(|| list.first())
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .map(str::to_string),
            _ => None,
        };
        let mut added_tokens = Vec::new();
        if let Some(serde_json::Value::Object(map)) = v.get("added_tokens_decoder") {
            for (id, t) in map {
                if let (Ok(id), Some(content)) = (id.parse::<u32>(), t.get("content").and_then(|c| c.as_str())) {
                    added_tokens.push((id, content.to_string()));
                }
            }
        }
        Ok(TokenizerConfig {
            bos_token: token("bos_token"),
            eos_token: token("eos_token"),
            add_bos_token: v.get("add_bos_token").and_then(|b| b.as_bool()).unwrap_or(false),
            chat_template,
            added_tokens,
        })
    }

    /// The id of a special token's text, from `added_tokens_decoder`.
    pub fn added_token_id(&self, text: &str) -> Option<u32> {
        self.added_tokens.iter().find(|(_, t)| t == text).map(|(id, _)| *id)
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos_token: String,
    eos_token: String,
    /// True when the checkpoint had no template and [`PLAIN_TEMPLATE`] is used.
    pub is_plain: bool,
}

impl ChatTemplate {
    /// Compiles `source` (or the plain template when `None`).
    pub fn new(
        source: Option<&str>,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
    ) -> Result<ChatTemplate, ServeError> {
        let is_plain = source.is_none();
        let mut env = minijinja::Environment::new();
        // Python string methods (.strip(), .startswith(), ...) that HF templates call.
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        // Jinja2 as transformers configures it: trim_blocks and lstrip_blocks on.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", source.unwrap_or(PLAIN_TEMPLATE).to_string())
            .map_err(|e| ServeError::Load(format!("the chat template does not compile: {e}")))?;
        Ok(ChatTemplate {
            env,
            bos_token: bos_token.unwrap_or_default().to_string(),
            eos_token: eos_token.unwrap_or_default().to_string(),
            is_plain,
        })
    }

    /// The prompt text for `messages`, ending with the assistant's turn opener when
    /// `add_generation_prompt`. Errors (including the template's `raise_exception`) are the
    /// caller's fault: a role order the template refuses, say.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, ServeError> {
        let tmpl = self.env.get_template("chat").map_err(|e| ServeError::Template(e.to_string()))?;
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        };
        tmpl.render(ctx).map_err(|e| {
            // raise_exception's message is the useful part.
            let detail = e.detail().map(str::to_string).unwrap_or_else(|| e.to_string());
            ServeError::Template(detail)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs(pairs: &[(&str, &str)]) -> Vec<ChatMessage> {
        pairs.iter().map(|(r, c)| ChatMessage { role: r.to_string(), content: c.to_string() }).collect()
    }

    #[test]
    fn plain_template() {
        let t = ChatTemplate::new(None, None, None).unwrap();
        let out = t.render(&msgs(&[("system", "Be brief."), ("user", "Hi")]), true).unwrap();
        assert_eq!(out, "System: Be brief.\nUser: Hi\nAssistant:");
    }

    #[test]
    fn zephyr_style_template_with_python_methods_and_raise_exception() {
        // The TinyLlama-chat / Zephyr template, as shipped in tokenizer_config.json.
        let src = "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}";
        let t = ChatTemplate::new(Some(src), Some("<s>"), Some("</s>")).unwrap();
        let out = t.render(&msgs(&[("system", "S"), ("user", "U")]), true).unwrap();
        assert_eq!(out, "<|system|>\nS</s>\n<|user|>\nU</s>\n<|assistant|>\n");

        let src = "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}[{{ m['content'].strip() }}]{% endfor %}";
        let t = ChatTemplate::new(Some(src), Some("<s>"), Some("</s>")).unwrap();
        assert_eq!(t.render(&msgs(&[("user", "  hi  ")]), true).unwrap(), "<s>[hi]");
        let err = t.render(&msgs(&[("system", "x")]), true).unwrap_err();
        assert!(err.to_string().contains("System role not supported"), "{err}");
    }

    #[test]
    fn tokenizer_config_forms() {
        let c = TokenizerConfig::parse(
            r#"{"bos_token": {"content": "<s>", "lstrip": false}, "eos_token": "</s>", "add_bos_token": true,
                "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}],
                "added_tokens_decoder": {"1": {"content": "<s>"}, "2": {"content": "</s>"}}}"#,
        )
        .unwrap();
        assert_eq!(c.bos_token.as_deref(), Some("<s>"));
        assert_eq!(c.eos_token.as_deref(), Some("</s>"));
        assert!(c.add_bos_token);
        assert_eq!(c.chat_template.as_deref(), Some("D"));
        assert_eq!(c.added_token_id("</s>"), Some(2));
        assert!(TokenizerConfig::parse("{").is_err());
    }
}
