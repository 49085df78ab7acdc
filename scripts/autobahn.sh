#!/bin/sh
# Websocket conformance: runs the Autobahn client cases 1-7, 9 and 10 (the
# 12/13 compression cases do not apply: the daemon offers no extension) from
# kosoku's fuzzingserver against examples/wsclient.rs, which uses the daemon's
# own dial, websocket config and link-ending code, then compares every case's
# verdict with tests/data/autobahn-expected.json. Exits non-zero on any
# difference or on any FAILED case without a reason recorded there (none).
#   scripts/autobahn.sh            run and compare
#   scripts/autobahn.sh --update   run and rewrite the expected file
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
EXPECTED="$ROOT/tests/data/autobahn-expected.json"
UPDATE=0
[ "${1:-}" = "--update" ] && UPDATE=1

command -v kosoku >/dev/null 2>&1 || python3 -m pip install --quiet kosoku
cargo build --quiet --example wsclient --manifest-path "$ROOT/Cargo.toml"
CLIENT="$ROOT/target/debug/examples/wsclient"

# kept after a failed run for a look at kosoku's reports
WORK="$ROOT/target/autobahn"
rm -rf "$WORK"
mkdir -p "$WORK"
SERVER_PID=""
cleanup() {
    [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null || true
}
trap cleanup EXIT INT TERM

# run NAME CASE-ARGS...: one fuzzingserver run on a free port, one client run
run() {
    name=$1
    shift
    # created here: the background job may open them after the first look
    : >"$WORK/$name.err"
    : >"$WORK/$name.out"
    kosoku -m fuzzingserver 127.0.0.1:0 "$@" -o "$WORK/$name" >"$WORK/$name.out" 2>"$WORK/$name.err" &
    SERVER_PID=$!
    url=""
    i=0
    while [ -z "$url" ] && [ $i -lt 300 ]; do # up to 30 s for it to listen
        url=$(sed -n 's/^fuzzingserver listening on \(ws:[^ ]*\).*/\1/p' "$WORK/$name.err")
        [ -n "$url" ] || { kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; }
        i=$((i + 1))
    done
    if [ -z "$url" ]; then
        cat "$WORK/$name.err" >&2
        echo "autobahn.sh: kosoku did not start" >&2
        exit 1
    fi
    "$CLIENT" "$url" mender-connect >"$WORK/$name.client" 2>&1 || {
        cat "$WORK/$name.client" >&2
        echo "autobahn.sh: the client failed" >&2
        exit 1
    }
    # kosoku exits 1 when a case failed; the comparison below judges that
    wait "$SERVER_PID" || true
    SERVER_PID=""
    tail -n 4 "$WORK/$name.err" "$WORK/$name.out" | grep -v "^==>\|^$\|listening" >&2 || true
}

# 9.1.6/9.2.6 (16 MiB messages) sit exactly at the daemon's inbound limit
# (dial::MAX_INBOUND_MESSAGE) and run on their own so a slow machine shows
# which part took the time.
run conform -i '1.*' -i '2.*' -i '3.*' -i '4.*' -i '5.*' -i '6.*' -i '7.*' \
    -i '9.*' -i '10.*' -x 9.1.6 -x 9.2.6
run oversize -i 9.1.6 -i 9.2.6

python3 - "$WORK" "$EXPECTED" "$UPDATE" <<'EOF'
import json, sys
work, expected_path, update = sys.argv[1], sys.argv[2], sys.argv[3] == "1"

def key(case_id):
    return [int(p) for p in case_id.split(".")]

actual = {}
for run in ("conform", "oversize"):
    with open(f"{work}/{run}/index.json") as f:
        index = json.load(f)
    for agent_cases in index.values():
        for case_id, r in agent_cases.items():
            actual[case_id] = {
                "behavior": r["behavior"],
                "behaviorClose": r["behaviorClose"],
                "remoteCloseCode": r["remoteCloseCode"],
            }
actual = dict(sorted(actual.items(), key=lambda kv: key(kv[0])))

with open(expected_path) as f:
    expected_doc = json.load(f)

if update:
    for case_id, why in expected_doc.get("why", {}).items():
        if case_id not in actual:
            sys.exit(f"autobahn.sh: 'why' names unknown case {case_id}")
    expected_doc["cases"] = actual
    with open(expected_path, "w") as f:
        json.dump(expected_doc, f, indent=1)
        f.write("\n")
    print(f"autobahn.sh: wrote {len(actual)} cases to {expected_path}")
    sys.exit(0)

expected = expected_doc["cases"]
bad = []
for case_id in sorted(set(expected) | set(actual), key=key):
    e, a = expected.get(case_id), actual.get(case_id)
    if e != a:
        bad.append(f"  {case_id}: expected {e}, got {a}")
failed = [c for c, r in actual.items() if "FAILED" in (r["behavior"], r["behaviorClose"])]
unexplained = [c for c in failed if c not in expected_doc.get("why", {})]
counts = {}
for r in actual.values():
    counts[r["behavior"]] = counts.get(r["behavior"], 0) + 1
print(f"autobahn.sh: {len(actual)} cases, behaviors {counts}; "
      f"FAILED only where recorded: {failed}")
if bad or unexplained:
    print("autobahn.sh: results differ from tests/data/autobahn-expected.json:")
    print("\n".join(bad))
    if unexplained:
        print(f"  FAILED without a recorded reason: {unexplained}")
    sys.exit(1)
print("autobahn.sh: results match the expected file")
EOF
