//! Rust `tracing` events → Python `logging`, under the `kvbridge` logger.
//!
//! In vLLM the `kvbridge` logger gets vLLM's own handlers (see `kvbridge/_logging.py`), so
//! Rust lines look like every other vLLM line: process, level, time, `[file.rs:line]`.
//!
//! Events are formatted where they happen (level filter first: nothing is formatted for a
//! disabled level) and handed over a bounded queue to one `kvbridge-log` thread, the only
//! one that takes the GIL for logging. A thread holding a kvbridge lock therefore never
//! waits for the GIL (the engine thread may hold the GIL while it waits for that lock),
//! and a full queue drops lines (counted) rather than stall a transfer.
use std::fmt::{Debug, Write as _};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};

use pyo3::prelude::*;
use pyo3::types::PyTuple;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// Lines waiting for the logging thread; past this they are dropped.
const QUEUE: usize = 8192;

/// Set at interpreter exit (`kvbridge._logging` registers it with `atexit`): after it the
/// logging thread no longer takes the GIL.
pub static STOPPED: AtomicBool = AtomicBool::new(false);
/// Lines dropped because the queue was full.
pub static DROPPED: AtomicU64 = AtomicU64::new(0);

struct Line {
    level: i32,
    file: &'static str,
    line: u32,
    msg: String,
}

/// `message` first, then ` key=value` per field, as tracing-subscriber's fmt writes them
/// (so log parsers written for either keep working).
#[derive(Default)]
struct Fields {
    message: String,
    rest: String,
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let _ = write!(self.rest, " {}={value:?}", field.name());
        }
    }
}

/// A span's fields, formatted once when it is created, and when that was.
struct SpanFields(String, std::time::Instant);

pub struct PyLogLayer {
    tx: SyncSender<Line>,
}

fn python_level(level: &Level) -> i32 {
    match *level {
        Level::ERROR => 40,
        Level::WARN => 30,
        Level::INFO => 20,
        Level::DEBUG => 10,
        Level::TRACE => 5,
    }
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for PyLogLayer {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut f = Fields::default();
        attrs.record(&mut f);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(SpanFields(f.rest.trim_start().to_string(), std::time::Instant::now()));
        }
    }

    /// A span ending logs its duration (spans are handshake, plan, read, write, notify).
    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        let meta = span.metadata();
        let ext = span.extensions();
        let Some(SpanFields(fields, t0)) = ext.get::<SpanFields>() else { return };
        let sep = if fields.is_empty() { "" } else { " " };
        let msg = format!("{}: done{sep}{fields} ms={:.3}", span.name(), t0.elapsed().as_secs_f64() * 1e3);
        self.send(meta, msg);
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let meta = event.metadata();
        let mut msg = String::new();
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope.from_root() {
                let ext = span.extensions();
                match ext.get::<SpanFields>() {
                    Some(SpanFields(f, _)) if !f.is_empty() => {
                        let _ = write!(msg, "{}{{{f}}}:", span.name());
                    }
                    _ => {
                        let _ = write!(msg, "{}:", span.name());
                    }
                }
            }
            if !msg.is_empty() {
                msg.push(' ');
            }
        }
        let mut f = Fields::default();
        event.record(&mut f);
        msg.push_str(&f.message);
        msg.push_str(&f.rest);
        self.send(meta, msg);
    }
}

impl PyLogLayer {
    /// Queue one line for the logging thread; a full queue drops it (counted).
    fn send(&self, meta: &'static tracing::Metadata<'static>, msg: String) {
        let file = meta.file().map(|p| p.rsplit('/').next().unwrap_or(p)).unwrap_or("kvbridge");
        let line = Line { level: python_level(meta.level()), file, line: meta.line().unwrap_or(0), msg };
        if let Err(TrySendError::Full(_)) = self.tx.try_send(line) {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The layer plus the thread that hands its lines to Python's `logging.getLogger("kvbridge")`.
pub fn layer() -> std::io::Result<PyLogLayer> {
    let (tx, rx) = sync_channel(QUEUE);
    std::thread::Builder::new().name("kvbridge-log".into()).spawn(move || forward(rx))?;
    Ok(PyLogLayer { tx })
}

fn forward(rx: Receiver<Line>) {
    let logger: Option<Py<PyAny>> =
        Python::with_gil(|py| py.import("logging").and_then(|m| m.call_method1("getLogger", ("kvbridge",))).map(Bound::unbind).ok());
    let Some(logger) = logger else { return };
    while let Ok(first) = rx.recv() {
        if STOPPED.load(Ordering::Relaxed) {
            return;
        }
        // Take the GIL once for everything queued.
        let mut batch = vec![first];
        batch.extend(rx.try_iter().take(1024));
        Python::with_gil(|py| {
            let logger = logger.bind(py);
            for l in batch {
                if !logger.call_method1("isEnabledFor", (l.level,)).and_then(|b| b.is_truthy()).unwrap_or(false) {
                    continue;
                }
                let args = PyTuple::empty(py);
                let record = logger.call_method1("makeRecord", ("kvbridge", l.level, l.file, l.line, l.msg, args, py.None()));
                if let Ok(record) = record {
                    let _ = logger.call_method1("handle", (record,));
                }
            }
        });
    }
}
