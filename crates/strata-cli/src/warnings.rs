//! Warnings a command's own work logs (a holder whose bytes were refused,
//! a stat cache that could not be read) go to the client that asked for
//! it, as `warning:` lines on its terminal, as they would without a
//! daemon; the daemon's log keeps them too.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Mutex, OnceLock, PoisonError};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber, span};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

/// Where the warnings within each command's span go, by span.
type Sinks = Mutex<HashMap<span::Id, Box<dyn Fn(&str) + Send + Sync>>>;

fn sinks() -> &'static Sinks {
    static SINKS: OnceLock<Sinks> = OnceLock::new();
    SINKS.get_or_init(Sinks::default)
}

/// Sends the warnings logged within `span` (and the spans and tasks under
/// it) to `write` until dropped.
pub struct Forwarding(Option<span::Id>);

/// Forwards the warnings of `span` to `write`, one line each.
pub fn forward(span: &tracing::Span, write: impl Fn(&str) + Send + Sync + 'static) -> Forwarding {
    let id = span.id();
    if let Some(id) = &id {
        sinks()
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id.clone(), Box::new(write));
    }
    Forwarding(id)
}

impl Drop for Forwarding {
    fn drop(&mut self) {
        if let Some(id) = self.0.take() {
            sinks()
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&id);
        }
    }
}

/// The layer that forwards, whatever the log level: it sees warnings and
/// errors, and the spans (info and up) that say whose they are.
pub fn layer<S: Subscriber + for<'a> LookupSpan<'a>>() -> impl Layer<S> {
    ClientWarnings.with_filter(tracing_subscriber::filter::filter_fn(|meta| {
        let most = if meta.is_span() {
            Level::INFO
        } else {
            Level::WARN
        };
        *meta.level() <= most
    }))
}

/// A warning or error event within a forwarded span is written to that
/// span's sink.
struct ClientWarnings;

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for ClientWarnings {
    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        if *event.metadata().level() > Level::WARN {
            return;
        }
        let Some(scope) = ctx.event_scope(event) else {
            return;
        };
        let sinks = sinks().lock().unwrap_or_else(PoisonError::into_inner);
        if sinks.is_empty() {
            return;
        }
        for span in scope {
            if let Some(write) = sinks.get(&span.id()) {
                let mut line = Line::default();
                event.record(&mut line);
                write(&line.text());
                return;
            }
        }
    }
}

/// An event as a line: its message, then its fields in parentheses.
#[derive(Default)]
struct Line {
    message: String,
    fields: Vec<String>,
}

impl Line {
    fn text(&self) -> String {
        let mut text = format!("warning: {}", self.message);
        if !self.fields.is_empty() {
            let _ = write!(text, " ({})", self.fields.join(", "));
        }
        text.push('\n');
        text
    }
}

impl Visit for Line {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        } else {
            self.fields.push(format!("{}={value:?}", field.name()));
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_string();
        } else {
            self.fields.push(format!("{}={value}", field.name()));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;

    #[test]
    fn a_command_s_warnings_reach_its_client_and_no_other() {
        let subscriber = tracing_subscriber::registry().with(layer());
        let got: Arc<Mutex<Vec<String>>> = Arc::default();
        tracing::subscriber::with_default(subscriber, || {
            let command = tracing::info_span!("command");
            let seen = Arc::clone(&got);
            let forwarding = forward(&command, move |line| {
                seen.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(line.into())
            });
            command.in_scope(|| {
                let inner = tracing::info_span!("fetch");
                inner.in_scope(|| {
                    tracing::warn!(holder = %"worker-2", "refused its bytes; trying the next");
                    tracing::info!("not a warning");
                });
            });
            // Outside the command: another command's, or the daemon's own.
            tracing::warn!("the daemon's own");
            drop(forwarding);
            command.in_scope(|| tracing::warn!("after the command ended"));
        });
        assert_eq!(
            *got.lock().unwrap_or_else(PoisonError::into_inner),
            vec!["warning: refused its bytes; trying the next (holder=worker-2)\n".to_string()]
        );
    }
}
