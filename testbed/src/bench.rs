//! What the side-by-side benches (`compare`, `mender_cli_pf`) share: their
//! command line and the median they print.

use std::path::PathBuf;

/// The two daemons to run and how many alternating rounds.
pub struct Pair {
    /// Our binary (`--ours`, else the one cargo built for this bench).
    pub ours: PathBuf,
    /// The other daemon (`--theirs`, else Debian's `/usr/bin/mender-connect`).
    pub theirs: PathBuf,
    /// `--rounds` (at least 1; 3 unless given).
    pub rounds: usize,
}

/// Reads `--ours PATH --theirs PATH --rounds N`; anything else (cargo's
/// `--bench`) is ignored.
pub fn pair_args() -> Pair {
    let mut ours = None;
    let mut theirs = None;
    let mut rounds = 3;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--ours" => ours = it.next().map(PathBuf::from),
            "--theirs" => theirs = it.next().map(PathBuf::from),
            "--rounds" => rounds = it.next().and_then(|v| v.parse().ok()).unwrap_or(3),
            _ => {}
        }
    }
    Pair {
        ours: ours
            .or_else(|| crate::daemon::binary().map(PathBuf::from))
            .expect("--ours PATH"),
        theirs: theirs.unwrap_or_else(|| PathBuf::from("/usr/bin/mender-connect")),
        rounds: rounds.max(1),
    }
}

/// The median (mean of the middle two for an even count); 0 for no values.
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    match n {
        0 => 0.0,
        _ if n % 2 == 1 => s[n / 2],
        _ => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}
