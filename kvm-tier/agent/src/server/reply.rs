//! How an operation answers: [`OpResult`], the response with its payload, or a [`Failure`]:
//! an `error{kind, message}` frame, or (for [`Failure::Connection`]) the connection closed.

use std::io::{self, Write};

use crate::proto::{self, Response, error_kind};

/// A request failed: either answer `error{kind, message}` or, for `Connection`, close.
#[derive(Debug)]
pub(super) enum Failure {
    Reply { kind: &'static str, message: String },
    Connection(io::Error),
}

impl Failure {
    pub(super) fn reply(kind: &'static str, message: impl Into<String>) -> Self {
        Failure::Reply {
            kind,
            message: message.into(),
        }
    }

    pub(super) fn io(context: &str, e: &io::Error) -> Self {
        let kind = match e.kind() {
            io::ErrorKind::NotFound => error_kind::NOT_FOUND,
            io::ErrorKind::PermissionDenied => error_kind::PERMISSION,
            io::ErrorKind::InvalidInput | io::ErrorKind::InvalidFilename => error_kind::INVALID,
            io::ErrorKind::Unsupported => error_kind::UNSUPPORTED,
            _ => error_kind::IO,
        };
        Failure::reply(kind, format!("{context}: {e}"))
    }
}

pub(super) type OpResult = Result<(Response, Vec<u8>), Failure>;

pub(super) fn ok(resp: Response) -> OpResult {
    Ok((resp, Vec::new()))
}

pub(super) fn send_error<W: Write>(w: &mut W, kind: &str, message: &str) -> io::Result<()> {
    proto::write_frame(
        w,
        &Response::Error {
            kind: kind.to_string(),
            message: message.to_string(),
        },
        &[],
    )
}

pub(super) fn unknown_pid(pid: u32) -> Failure {
    Failure::reply(error_kind::NOT_FOUND, format!("no process {pid}"))
}
