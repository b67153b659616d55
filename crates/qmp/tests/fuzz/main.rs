//! Every parser of what a QMP monitor sends (greeting, replies, errors,
//! events), fed random and mutated input by a hostile peer: no panic, a
//! typed error, bounded memory.

mod peer;
mod watch;
