//! The operator's control API: the server ([`server`], HTTP/1.1 + JSON on a Unix socket) and
//! its typed client ([`client`]).

pub mod client;
pub mod http;
pub mod server;

pub use client::ApiClient;
pub use server::{ApiContext, ApiError, ApiServer};
