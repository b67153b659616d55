//! Every parser of what a XenServer host sends, fed random and mutated
//! input: no panic, a typed error, memory in proportion to what arrived.
//! `codecs` drives the decoders directly; `hostile` plays a lying host
//! over a real socket.

mod codecs;
mod hostile;
mod watch;
