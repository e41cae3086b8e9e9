//! The client protocol types, generated from `proto/imgate/v1/imgate.proto` by `build.rs`.
#![allow(clippy::all, missing_docs)]

include!(concat!(env!("OUT_DIR"), "/imgate.v1.rs"));
