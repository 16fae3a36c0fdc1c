//! Test kit: network namespaces, a fake QEMU for helpers, the tiny guest.
