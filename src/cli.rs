//! Command-line parsing with Go `flag` / urfave-cli grammar (behavior.md §1).
