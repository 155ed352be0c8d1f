//! Streams of a caller who loses access: when the policy is read again (SIGHUP) and the
//! caller of an open stream no longer holds the role its method needs, the stream ends
//! PERMISSION_DENIED at once, with trailers the client reads as any other end.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body::Frame;
use tonic::Status;
use tonic::body::Body;

use crate::callers::{Caller, Callers, Role};

/// What a stream of `caller` needs to go on.
pub struct Revocation {
    callers: Arc<Callers>,
    caller: Arc<Caller>,
    role: Role,
}

impl Revocation {
    pub fn new(callers: &Arc<Callers>, caller: Arc<Caller>, role: Role) -> Self {
        Self {
            callers: callers.clone(),
            caller,
            role,
        }
    }

    /// The response with a body that ends PERMISSION_DENIED once the caller lost
    /// access.
    pub fn wrap(self, response: http::Response<Body>) -> http::Response<Body> {
        let (parts, inner) = response.into_parts();
        let changed = next_change(self.callers.clone());
        let body = RevocableBody {
            inner,
            revocation: self,
            changed: Some(changed),
            ended: false,
        };
        http::Response::from_parts(parts, Body::new(body))
    }

    fn still_allowed(&self) -> bool {
        self.callers
            .policy()
            .still_may(&self.caller.name, self.role)
    }
}

/// Resolves when the policy next changes; `false` if it never will.
fn next_change(callers: Arc<Callers>) -> BoxFuture<'static, bool> {
    let mut changes = callers.changes();
    changes.mark_unchanged();
    Box::pin(async move { changes.changed().await.is_ok() })
}

pin_project_lite::pin_project! {
    struct RevocableBody {
        #[pin]
        inner: Body,
        revocation: Revocation,
        changed: Option<BoxFuture<'static, bool>>,
        // The stream was ended here: nothing follows the trailers.
        ended: bool,
    }
}

impl http_body::Body for RevocableBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.project();
        if *this.ended {
            return Poll::Ready(None);
        }
        if let Some(changed) = this.changed.as_mut()
            && let Poll::Ready(more) = changed.as_mut().poll(cx)
        {
            *this.changed = more.then(|| next_change(this.revocation.callers.clone()));
            if !this.revocation.still_allowed() {
                *this.changed = None;
                *this.ended = true;
                let status = Status::permission_denied(format!(
                    "caller {:?} lost the {} role this stream needs",
                    this.revocation.caller.name,
                    this.revocation.role.as_str()
                ));
                let mut trailers = http::HeaderMap::new();
                let _ = status.add_header(&mut trailers);
                return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
            }
            if this.changed.is_some() {
                cx.waker().wake_by_ref();
            }
        }
        let frame = ready!(this.inner.poll_frame(cx));
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }
}
