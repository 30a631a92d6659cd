//! The hot-patch file format (see docs/patch-format.md).
