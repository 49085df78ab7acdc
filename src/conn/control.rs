//! Bodies of the control protocol (protocol.md §2.6): Open, Accept, Error.
