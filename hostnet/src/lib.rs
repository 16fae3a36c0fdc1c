//! Host networking primitives shared by the qnet binaries.
//!
//! Everything here is synchronous and free of async runtimes: it is linked
//! into setuid/file-capability helpers, where every dependency is attack
//! surface and every millisecond of start-up is paid per guest NIC.

pub mod acl;
pub mod link;
