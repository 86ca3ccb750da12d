#!/usr/bin/env bash
# The operator CLI in a real terminal (tmux): a destructive command asks before acting, "n"
# changes nothing, "y" goes ahead, and a rebuild draws its progress bar.
#
# Usage: scripts/cli-terminal-check.sh   (needs tmux, PostgreSQL at $ADMIN_URL, and
# `cargo build -p factum-cli --example bank_admin` done; creates and drops its own database)
set -euo pipefail
cd "$(dirname "$0")/.."

admin=${ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
db=factum_cli_terminal_$$
url=${admin%/*}/$db
bin=${CARGO_TARGET_DIR:-target}/debug/examples/bank_admin
session=factum-cli-check-$$

psql "$admin" -qc "CREATE DATABASE $db"
cleanup() {
  tmux kill-session -t "$session" 2>/dev/null || true
  psql "$admin" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)"
}
trap cleanup EXIT

DATABASE_URL=$url "$bin" seed 5000 >/dev/null

tmux new-session -d -s "$session" -x 150 -y 40
tmux send-keys -t "$session" "export DATABASE_URL=$url; clear" Enter

# Waits until the pane shows $1, ${2:-1} times (at most 60 s).
wait_for() {
  for _ in $(seq 600); do
    if [ "$(tmux capture-pane -p -t "$session" | grep -cF -- "$1")" -ge "${2:-1}" ]; then
      return 0
    fi
    sleep 0.1
  done
  echo "the terminal never showed: $1" >&2
  tmux capture-pane -p -t "$session" >&2
  exit 1
}

tmux send-keys -t "$session" "$bin projections rebuild balances" Enter
wait_for "swap them in? [y/N]"
tmux send-keys -t "$session" "n" Enter
wait_for "error: not confirmed: nothing was changed"

tmux send-keys -t "$session" "$bin projections rebuild balances" Enter
wait_for "swap them in? [y/N]" 2
tmux send-keys -t "$session" "y" Enter
wait_for "rebuilt \`balances\` up to position"
screen=$(tmux capture-pane -p -t "$session")
if ! grep -qE '^rebuilding balances \[=+\] 5100/5100 events, [0-9]+ events/s' <<<"$screen"; then
  echo "no finished progress bar on the terminal:" >&2
  echo "$screen" >&2
  exit 1
fi
echo "$screen" | grep -v '^$'
echo "terminal check: 1 passed, 0 failed"
