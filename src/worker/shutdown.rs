//! Shutdown: SIGTERM or SIGINT fires [`Shutdown::graceful`] (the worker stops claiming,
//! finishes in-flight calls within `worker.shutdown_timeout`, and releases what is left); a
//! second signal fires [`Shutdown::force`] (in-flight calls are abandoned at once and their
//! claims put back, within a bounded time).

use tokio_util::sync::CancellationToken;

/// The two stages of a shutdown.
#[derive(Clone, Debug, Default)]
pub struct Shutdown {
    /// Stop claiming; let in-flight calls finish.
    pub graceful: CancellationToken,
    /// Stop waiting for in-flight calls: abandon them and put their claims back.
    pub force: CancellationToken,
}

impl Shutdown {
    /// A shutdown only the caller fires.
    pub fn new() -> Self {
        Self::default()
    }

    /// A shutdown fired by signals: the first SIGTERM/SIGINT is graceful, the second forces.
    /// The handlers are installed before this returns, so a signal that arrives while the
    /// process is still starting is not lost (it would otherwise kill the process).
    pub fn on_signals() -> Self {
        let shutdown = Self::new();
        let mut signals = Signals::install();
        let fired = shutdown.clone();
        tokio::spawn(async move {
            signals.next().await;
            tracing::info!("shutdown signal received: no new claims; finishing in-flight calls (a second signal abandons them)");
            fired.graceful.cancel();
            signals.next().await;
            tracing::warn!(
                "second shutdown signal: abandoning in-flight calls and putting their claims back"
            );
            fired.force.cancel();
        });
        shutdown
    }
}

impl From<CancellationToken> for Shutdown {
    /// Graceful on `token`; never forced.
    fn from(token: CancellationToken) -> Self {
        Self {
            graceful: token,
            force: CancellationToken::new(),
        }
    }
}

#[cfg(unix)]
struct Signals {
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
}

#[cfg(unix)]
impl Signals {
    fn install() -> Self {
        use tokio::signal::unix::{signal, SignalKind};
        let term = signal(SignalKind::terminate())
            .map_err(|e| tracing::warn!(error = %e, "cannot handle SIGTERM"))
            .ok();
        let int = signal(SignalKind::interrupt())
            .map_err(|e| tracing::warn!(error = %e, "cannot handle SIGINT"))
            .ok();
        Self { term, int }
    }

    async fn next(&mut self) {
        async fn recv(s: &mut Option<tokio::signal::unix::Signal>) {
            match s {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            _ = recv(&mut self.term) => {}
            _ = recv(&mut self.int) => {}
        }
    }
}

#[cfg(not(unix))]
struct Signals;

#[cfg(not(unix))]
impl Signals {
    fn install() -> Self {
        Self
    }

    async fn next(&mut self) {
        let _ = tokio::signal::ctrl_c().await;
    }
}
