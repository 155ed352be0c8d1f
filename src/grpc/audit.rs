//! The audit log: one line on the `restock::audit` target for every call of a write or
//! admin RPC, with the caller, the method, the product and user where the call names
//! them, and the status code it was answered with.

use tonic::{Code, Status};

use crate::callers::CallerOf;

/// The target audit lines are logged on, so that they can be routed apart.
pub const TARGET: &str = "restock::audit";

/// Logs a write or admin call that reached its handler, once it is answered.
pub fn call<T>(
    caller: Option<&CallerOf>,
    method: &str,
    product: Option<i64>,
    user: Option<i64>,
    answer: &Result<T, Status>,
) {
    let code = match answer {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    };
    tracing::info!(
        target: TARGET,
        caller = caller.map_or("anonymous", CallerOf::name),
        method,
        product_id = product,
        user_id = user,
        code = ?code,
        "audit"
    );
}

/// Logs a write or admin call the authorization layer refused.
pub fn denied(caller: &CallerOf, method: &str, status: &Status) {
    tracing::info!(
        target: TARGET,
        caller = caller.name(),
        method,
        code = ?status.code(),
        "audit"
    );
}
