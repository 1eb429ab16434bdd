//! A hyper client connector for a child on a unix socket: every request,
//! whatever its URI, goes to that one socket. The upstream pool and the
//! supervisor's health probe both reach unix-socket children through it.
//!
//! A leaf: no `crate::` imports.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper::Uri;
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

/// Connects every request, whatever its URI, to one unix socket.
#[derive(Debug, Clone)]
pub struct UnixConnector(Arc<Path>);

impl UnixConnector {
    pub fn new(path: &Path) -> UnixConnector {
        UnixConnector(Arc::from(path))
    }
}

impl tower_service::Service<Uri> for UnixConnector {
    type Response = TokioIo<UnixStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let path = self.0.clone();
        Box::pin(async move { Ok(TokioIo::new(UnixStream::connect(&*path).await?)) })
    }
}
