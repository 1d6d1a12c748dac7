//! Server-wide shutdown in two steps: first stop taking new work (stop accepting, stop reading
//! requests), then, after a grace period, abandon requests still waiting (they get ESHUTDOWN).

use tokio::sync::watch;

/// Held by the server; every connection and request holds a [`Shutdown`].
pub struct ShutdownController {
    stopping: watch::Sender<bool>,
    abandon: watch::Sender<bool>,
}

/// A handle that resolves when shutdown reaches each step.
#[derive(Clone)]
pub struct Shutdown {
    stopping: watch::Receiver<bool>,
    abandon: watch::Receiver<bool>,
}

impl ShutdownController {
    pub fn new() -> ShutdownController {
        ShutdownController { stopping: watch::Sender::new(false), abandon: watch::Sender::new(false) }
    }

    pub fn handle(&self) -> Shutdown {
        Shutdown { stopping: self.stopping.subscribe(), abandon: self.abandon.subscribe() }
    }

    /// Step one: stop taking new work.
    pub fn stop(&self) {
        self.stopping.send_replace(true);
    }

    /// Step two: give up on work still in progress.
    pub fn abandon(&self) {
        self.stopping.send_replace(true);
        self.abandon.send_replace(true);
    }
}

impl Default for ShutdownController {
    fn default() -> Self {
        ShutdownController::new()
    }
}

impl Shutdown {
    /// Resolves once the server stops taking new work (never, if the controller is gone first).
    pub async fn stopping(&mut self) {
        wait_true(&mut self.stopping).await
    }

    /// Resolves once in-flight work is to be abandoned.
    pub async fn abandoned(&mut self) {
        wait_true(&mut self.abandon).await
    }

    /// Whether the server has stopped taking new work: a cheap look, for a loop that only
    /// waits on [`Shutdown::stopping`] when it would wait anyway.
    pub fn is_stopping(&self) -> bool {
        *self.stopping.borrow()
    }
}

async fn wait_true(receiver: &mut watch::Receiver<bool>) {
    if receiver.wait_for(|value| *value).await.is_err() {
        // The controller was dropped without a shutdown: nothing will ever be signalled.
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn handles_resolve_in_order_and_late_handles_see_the_state() {
        let controller = ShutdownController::new();
        let mut early = controller.handle();
        assert!(!early.is_stopping());
        controller.stop();
        early.stopping().await;
        let mut late = controller.handle();
        assert!(late.is_stopping());
        controller.abandon();
        late.abandoned().await;
        early.abandoned().await;
    }
}
