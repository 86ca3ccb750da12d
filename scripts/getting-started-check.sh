#!/usr/bin/env bash
# Follows the book's getting-started chapter literally: a new crate beside this repository, the
# chapter's `cargo add` commands, the files it shows (the code blocks after a
# `<!-- file: PATH -->` line), then `cargo test`, which must pass.
#
# Usage: scripts/getting-started-check.sh   (uses DATABASE_URL when set, like the chapter)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
chapter=$repo/docs/src/getting-started.md
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The chapter's clone, beside the project.
ln -s "$repo" "$work/factum"
cd "$work"

# Step 1: the shell block of "## 1.", minus the clone (the repository is already here).
commands=$(awk '/^## 1\./ { in1 = 1 } in1 && /^```sh/ { on = 1; next } on && /^```/ { exit } on { print }' "$chapter" | grep -v '^git clone')
[ -n "$commands" ] || { echo "no commands found under '## 1.' in $chapter" >&2; exit 1; }
echo "$commands"
eval "$commands"   # ends inside ./counter

# Steps 2 and 3: the files.
python3 - "$chapter" <<'PY'
import re, sys, pathlib
text = pathlib.Path(sys.argv[1]).read_text()
files = re.findall(r"<!-- file: (\S+) -->\n```rust\n(.*?)\n```", text, re.S)
if len(files) < 2:
    sys.exit(f"expected the chapter's files, found {len(files)}")
for path, body in files:
    p = pathlib.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(body + "\n")
    print(f"wrote {path} ({len(body.splitlines())} lines)")
PY

# Step 4, in the workspace's target dir (its dependencies are built already).
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$repo/target}
cargo test 2>&1 | tee "$work/test.log"
grep -q "test counts_on_postgres ... ok" "$work/test.log"
echo "getting-started: 1 passed, 0 failed"
