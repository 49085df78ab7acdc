//! Configuration: load, merge (fallback then main), default and validate (behavior.md §1.5, §2).
