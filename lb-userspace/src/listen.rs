//! What lb's TCP listeners do when an accept fails (out of file
//! descriptors, say): wait a little and try again, rather than spin on an
//! error that would come back at once.

use std::{net::SocketAddr, time::Duration};

use tokio::net::{TcpListener, TcpStream};

/// How long a listener waits after a failed accept before the next.
pub const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// The next connection of `listener` (named `what` in the log); a failed
/// accept is logged and retried after [`ACCEPT_RETRY`].
pub async fn accept(listener: &TcpListener, what: &str) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(connection) => return connection,
            Err(e) => {
                tracing::warn!(error = %e, listener = what, "accepting a connection; retrying");
                tokio::time::sleep(ACCEPT_RETRY).await;
            }
        }
    }
}
