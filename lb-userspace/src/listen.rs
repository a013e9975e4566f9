//! What lb's listeners do when an accept fails (out of file descriptors,
//! say): wait a little and try again, rather than spin on an error that
//! would come back at once.

use std::{future::Future, time::Duration};

/// How long a listener waits after a failed accept before the next.
pub const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// The next connection `accept` (a listener's accept, TCP or Unix) gives;
/// a failed accept is logged, naming the listener `what`, and retried
/// after [`ACCEPT_RETRY`].
pub async fn accept<T, F>(what: &str, mut accept: impl FnMut() -> F) -> T
where
    F: Future<Output = std::io::Result<T>>,
{
    loop {
        match accept().await {
            Ok(connection) => return connection,
            Err(e) => {
                tracing::warn!(error = %e, listener = what, "accepting a connection; retrying");
                tokio::time::sleep(ACCEPT_RETRY).await;
            }
        }
    }
}
