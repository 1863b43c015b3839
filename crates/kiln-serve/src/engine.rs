//! The generation engine: one scheduler thread owns the model and a KV cache of `max_batch`
//! slots. Queued requests are prefilled into free slots; every step decodes all active
//! sequences in one `decode` call (continuous batching); finished sequences free their slot at
//! once, so a new request joins without waiting for the others to end.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use kiln_data::Tokenizer;
use kiln_model::{apply_penalties, sample_next, CausalLm, SamplingParams};
use kiln_tensor::CpuKernels;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::chat::{ChatMessage, ChatTemplate, TokenizerConfig, PLAIN_STOPS};
use crate::text::{Detokenizer, StopMatcher};
use crate::ServeError;

/// Everything about the served model except its weights; shared with the HTTP side.
pub struct ModelInfo {
    /// The name clients pass as `model`.
    pub name: String,
    pub model_type: String,
    pub context_len: usize,
    pub vocab_size: usize,
    pub tokenizer: Tokenizer,
    /// Ids that end generation (config's `eos_token_id`, `<|endoftext|>`, tokenizer_config's eos).
    pub eos_ids: Vec<u32>,
    /// Prepended to prompts when tokenizer_config.json sets `add_bos_token`.
    pub bos_id: Option<u32>,
    pub template: ChatTemplate,
}

impl ModelInfo {
    /// Token ids for a completion prompt (BOS first when the tokenizer wants one).
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, ServeError> {
        let mut ids = self.tokenizer.encode(text)?;
        if let Some(bos) = self.bos_id {
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
        Ok(ids)
    }

    /// Token ids for a chat: the template rendered with the generation prompt, then encoded
    /// (special tokens the template writes, such as `<s>`, become their ids).
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, ServeError> {
        let text = self.template.render(messages, true)?;
        self.encode_prompt(&text)
    }

    /// Stop sequences a chat adds by itself: under the plain template, the next turn's label.
    pub fn chat_stops(&self) -> Vec<String> {
        if self.template.is_plain {
            PLAIN_STOPS.iter().map(|s| s.to_string()).collect()
        } else {
            Vec::new()
        }
    }
}

/// Loads a checkpoint directory (a kiln run directory or a Hugging Face-style one with
/// config.json, model.safetensors, tokenizer.json and optionally tokenizer_config.json).
pub fn load_model(path: &Path) -> Result<(Box<dyn CausalLm>, ModelInfo), ServeError> {
    let dir = kiln_model::resolve_model_dir(path);
    let model = kiln_model::load_causal_lm(&dir)?;
    let tok_path = dir.join("tokenizer.json");
    if !tok_path.is_file() {
        return Err(ServeError::Load(format!("{} has no tokenizer.json", dir.display())));
    }
    let tokenizer = Tokenizer::from_file(&tok_path)?;
    let tc = TokenizerConfig::read(&dir)?;
    // A special token's id: from added_tokens_decoder, else by encoding its text alone.
    let id_of = |t: &str| {
        tc.added_token_id(t).or_else(|| match tokenizer.encode(t) {
            Ok(ids) if ids.len() == 1 => Some(ids[0]),
            _ => None,
        })
    };
    let mut eos_ids = kiln_model::read_eos_token_ids(&dir);
    eos_ids.extend(tokenizer.eot_id());
    eos_ids.extend(tc.eos_token.as_deref().and_then(id_of));
    eos_ids.sort_unstable();
    eos_ids.dedup();
    let bos_id = if tc.add_bos_token { tc.bos_token.as_deref().and_then(id_of) } else { None };
    let template = ChatTemplate::new(tc.chat_template.as_deref(), tc.bos_token.as_deref(), tc.eos_token.as_deref())?;
    // A kiln run keeps its checkpoint in RUN/checkpoint: the run's name is the better label.
    let named =
        if dir.file_name().is_some_and(|n| n == "checkpoint") { dir.parent().unwrap_or(&dir) } else { dir.as_path() };
    let name = named
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().to_string()))
        .unwrap_or_else(|| "kiln".to_string());
    let info = ModelInfo {
        name,
        model_type: model.model_type().to_string(),
        context_len: model.context_len(),
        vocab_size: model.vocab_size(),
        tokenizer,
        eos_ids,
        bos_id,
        template,
    };
    Ok((model, info))
}

/// What one request asks the engine for.
#[derive(Clone, Debug)]
pub struct GenRequest {
    pub prompt: Vec<u32>,
    /// New tokens at most (the EOS token counts as one).
    pub max_tokens: usize,
    pub params: SamplingParams,
    pub seed: u64,
    /// Text that ends generation; it is not part of the output.
    pub stop: Vec<String>,
    /// When the context fills, keep its last half and go on (as `kiln generate` always did);
    /// when false, prompt + max_tokens beyond the context is refused up front.
    pub context_shift: bool,
}

impl GenRequest {
    pub fn new(prompt: Vec<u32>, max_tokens: usize, params: SamplingParams) -> GenRequest {
        GenRequest { prompt, max_tokens, params, seed: 0, stop: Vec::new(), context_shift: false }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An EOS token or a stop sequence.
    Stop,
    /// max_tokens reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// What the engine tells a request's sink, in order: text deltas, then one `Done` or `Error`.
#[derive(Clone, Debug, PartialEq)]
pub enum GenEvent {
    Text(String),
    Done { reason: FinishReason, usage: Usage },
    Error(String),
}

/// Receives a request's events on the scheduler thread; returning false cancels the request
/// (the client went away) and frees its slot.
pub type Sink = Box<dyn FnMut(GenEvent) -> bool + Send>;

/// A finished, non-streamed generation.
#[derive(Clone, Debug, PartialEq)]
pub struct Completion {
    pub text: String,
    pub reason: FinishReason,
    pub usage: Usage,
}

#[derive(Clone, Copy, Debug)]
pub struct EngineConfig {
    /// Sequences decoded together (KV cache slots).
    pub max_batch: usize,
    /// Requests that may wait for a slot; more are refused with [`ServeError::QueueFull`].
    pub max_queue: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig { max_batch: 8, max_queue: 64 }
    }
}

struct Pending {
    req: GenRequest,
    sink: Sink,
}

struct Queue {
    pending: VecDeque<Pending>,
    shutdown: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    active: AtomicUsize,
    max_queue: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // A panic elsewhere while holding the lock leaves the queue itself consistent.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The running engine; dropping it stops the scheduler after the sequences in flight end.
pub struct Engine {
    info: Arc<ModelInfo>,
    max_batch: usize,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Engine {
    /// Starts the scheduler thread, which takes ownership of `model`.
    pub fn start(model: Box<dyn CausalLm>, info: ModelInfo, cfg: EngineConfig) -> Result<Engine, ServeError> {
        if cfg.max_batch == 0 {
            return Err(ServeError::Invalid("max_batch must be at least 1".into()));
        }
        let info = Arc::new(info);
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue { pending: VecDeque::new(), shutdown: false }),
            wake: Condvar::new(),
            active: AtomicUsize::new(0),
            max_queue: cfg.max_queue,
        });
        let (i, s) = (info.clone(), shared.clone());
        let thread = std::thread::Builder::new()
            .name("kiln-scheduler".into())
            .spawn(move || Scheduler::new(model, i, s, cfg.max_batch).run())
            .map_err(|e| ServeError::Load(format!("cannot start the scheduler thread: {e}")))?;
        Ok(Engine { info, max_batch: cfg.max_batch, shared, thread: Some(thread) })
    }

    pub fn info(&self) -> &Arc<ModelInfo> {
        &self.info
    }

    /// Sequences decoded together at most.
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// Requests waiting for a slot.
    pub fn queue_depth(&self) -> usize {
        self.shared.lock().pending.len()
    }

    /// Sequences being generated now.
    pub fn active(&self) -> usize {
        self.shared.active.load(Ordering::Relaxed)
    }

    /// Checks `req` and queues it; events go to `sink` on the scheduler thread.
    pub fn submit(&self, req: GenRequest, sink: Sink) -> Result<(), ServeError> {
        self.check(&req)?;
        let mut q = self.shared.lock();
        if q.shutdown {
            return Err(ServeError::ShutDown);
        }
        if q.pending.len() >= self.shared.max_queue {
            return Err(ServeError::QueueFull(self.shared.max_queue));
        }
        q.pending.push_back(Pending { req, sink });
        drop(q);
        self.shared.wake.notify_one();
        Ok(())
    }

    /// Generates to the end and returns the whole text (blocks the calling thread).
    pub fn generate(&self, req: GenRequest) -> Result<Completion, ServeError> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.submit(req, Box::new(move |ev| tx.send(ev).is_ok()))?;
        let mut text = String::new();
        for ev in rx {
            match ev {
                GenEvent::Text(t) => text += &t,
                GenEvent::Done { reason, usage } => return Ok(Completion { text, reason, usage }),
                GenEvent::Error(e) => return Err(ServeError::Generation(e)),
            }
        }
        Err(ServeError::ShutDown)
    }

    fn check(&self, req: &GenRequest) -> Result<(), ServeError> {
        let (ctx, vocab) = (self.info.context_len, self.info.vocab_size);
        if req.prompt.is_empty() {
            return Err(ServeError::Invalid("the prompt is empty (it encodes to no tokens)".into()));
        }
        if let Some(&bad) = req.prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(ServeError::Invalid(format!("token id {bad} is outside the model's vocabulary of {vocab}")));
        }
        if req.max_tokens == 0 {
            return Err(ServeError::Invalid("max_tokens must be at least 1".into()));
        }
        req.params.validate().map_err(ServeError::Invalid)?;
        if !req.context_shift && req.prompt.len() + req.max_tokens > ctx {
            return Err(ServeError::ContextOverflow {
                context: ctx,
                prompt: req.prompt.len(),
                max_tokens: req.max_tokens,
            });
        }
        Ok(())
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One sequence in a cache slot.
struct Seq {
    req: GenRequest,
    sink: Sink,
    rng: ChaCha8Rng,
    /// Prompt then generated tokens (penalties and context shifts read it).
    ids: Vec<u32>,
    generated: usize,
    detok: Detokenizer,
    stops: StopMatcher,
}

struct Scheduler {
    model: Box<dyn CausalLm>,
    info: Arc<ModelInfo>,
    shared: Arc<Shared>,
    kernels: CpuKernels,
    cache: kiln_model::KvCache,
    slots: Vec<Option<Seq>>,
}

/// On the way out (shutdown or a panic in model code) refuse what is still queued, so no
/// client waits forever.
struct DrainOnDrop(Arc<Shared>);

impl Drop for DrainOnDrop {
    fn drop(&mut self) {
        let mut q = self.0.lock();
        q.shutdown = true;
        for mut p in q.pending.drain(..) {
            (p.sink)(GenEvent::Error("the server is shutting down".into()));
        }
        self.0.active.store(0, Ordering::Relaxed);
    }
}

impl Scheduler {
    fn new(model: Box<dyn CausalLm>, info: Arc<ModelInfo>, shared: Arc<Shared>, max_batch: usize) -> Scheduler {
        let cache = model.new_cache(max_batch);
        Scheduler {
            model,
            info,
            shared,
            kernels: CpuKernels::default(),
            cache,
            slots: (0..max_batch).map(|_| None).collect(),
        }
    }

    fn run(mut self) {
        let _drain = DrainOnDrop(self.shared.clone());
        loop {
            let admitted = {
                let mut q = self.shared.lock();
                while q.pending.is_empty() && self.slots.iter().all(Option::is_none) && !q.shutdown {
                    q = self.shared.wake.wait(q).unwrap_or_else(|p| p.into_inner());
                }
                if q.shutdown && self.slots.iter().all(Option::is_none) {
                    return;
                }
                let mut admitted = Vec::new();
                for (slot, s) in self.slots.iter().enumerate() {
                    if s.is_none() && !q.shutdown {
                        match q.pending.pop_front() {
                            Some(p) => admitted.push((slot, p)),
                            None => break,
                        }
                    }
                }
                admitted
            };
            for (slot, p) in admitted {
                self.admit(slot, p);
            }
            self.shared.active.store(self.slots.iter().flatten().count(), Ordering::Relaxed);
            self.step();
        }
    }

    /// Prefills a request into `slot` and takes its first token.
    fn admit(&mut self, slot: usize, p: Pending) {
        let cap = self.cache.cap;
        let prompt = &p.req.prompt;
        // Only context-shifting requests get here with a prompt longer than the context.
        let window = &prompt[prompt.len().saturating_sub(cap)..];
        match self.model.prefill(&self.kernels, &mut self.cache, slot, window) {
            Ok(logits) => {
                let seq = Seq {
                    rng: ChaCha8Rng::seed_from_u64(p.req.seed),
                    ids: p.req.prompt.clone(),
                    generated: 0,
                    detok: Detokenizer::new(),
                    stops: StopMatcher::new(p.req.stop.clone()),
                    req: p.req,
                    sink: p.sink,
                };
                self.slots[slot] = Some(seq);
                self.take_token(slot, logits);
            }
            Err(e) => {
                let mut sink = p.sink;
                sink(GenEvent::Error(e.to_string()));
            }
        }
    }

    /// One decode step for every active sequence.
    fn step(&mut self) {
        let cap = self.cache.cap;
        let mut batch: Vec<usize> = Vec::new();
        for slot in 0..self.slots.len() {
            let Some(seq) = &self.slots[slot] else { continue };
            if self.cache.lens[slot] < cap {
                batch.push(slot);
                continue;
            }
            // The context is full: keep its last half and prefill again (a context shift).
            let keep = seq.ids[seq.ids.len() - cap / 2..].to_vec();
            match self.model.prefill(&self.kernels, &mut self.cache, slot, &keep) {
                Ok(logits) => self.take_token(slot, logits),
                Err(e) => self.fail(slot, &e.to_string()),
            }
        }
        if batch.is_empty() {
            return;
        }
        let tokens: Vec<u32> =
            batch.iter().map(|&s| self.slots[s].as_ref().and_then(|q| q.ids.last().copied()).unwrap_or(0)).collect();
        match self.model.decode(&self.kernels, &mut self.cache, &batch, &tokens) {
            Ok(logits) => {
                let vocab = logits.len() / batch.len();
                for (i, &slot) in batch.iter().enumerate() {
                    self.take_token(slot, logits[i * vocab..(i + 1) * vocab].to_vec());
                }
            }
            Err(e) => {
                for &slot in &batch {
                    self.fail(slot, &e.to_string());
                }
            }
        }
    }

    fn fail(&mut self, slot: usize, msg: &str) {
        if let Some(mut seq) = self.slots[slot].take() {
            (seq.sink)(GenEvent::Error(msg.to_string()));
        }
    }

    /// Samples the next token of `slot` from `logits`, streams its text, and ends the
    /// sequence on EOS, a stop sequence, max_tokens or a cancelled client.
    fn take_token(&mut self, slot: usize, mut logits: Vec<f32>) {
        let Some(seq) = self.slots[slot].as_mut() else { return };
        let n_prompt = seq.req.prompt.len();
        apply_penalties(&mut logits, &seq.ids, &seq.ids[n_prompt..], &seq.req.params);
        let id = sample_next(&logits, &seq.req.params, &mut seq.rng);
        seq.generated += 1;
        let tok = &self.info.tokenizer;
        let mut finish = None;
        let mut out = String::new();
        if self.info.eos_ids.contains(&id) {
            finish = Some(FinishReason::Stop);
        } else {
            seq.ids.push(id);
            let (text, stopped) = seq.stops.push(&seq.detok.push(tok, id));
            out = text;
            if stopped {
                finish = Some(FinishReason::Stop);
            } else if seq.generated >= seq.req.max_tokens {
                finish = Some(FinishReason::Length);
            }
        }
        if finish.is_some() && !seq.stops.stopped() {
            // Ending for another reason: what was held back is real output.
            let (text, stopped) = seq.stops.push(&seq.detok.flush(tok));
            out += &text;
            if stopped {
                finish = Some(FinishReason::Stop);
            } else {
                out += &seq.stops.flush();
            }
        }
        let alive = out.is_empty() || (seq.sink)(GenEvent::Text(out));
        if let Some(reason) = finish {
            let usage = Usage { prompt_tokens: n_prompt, completion_tokens: seq.generated };
            if alive {
                (seq.sink)(GenEvent::Done { reason, usage });
            }
        }
        if finish.is_some() || !alive {
            self.slots[slot] = None;
        }
    }
}
