//! The simulator is a server: hostile XML-RPC and JSON-RPC clients, and
//! hostile NBD export names, must get an answer or a refusal, never a
//! panic, an allocation sized by a claim, or a leaked connection slot.

mod nbd;
mod rpc;
mod watch;
