//! The VMM library: VM plumbing, vCPU control, control API.
