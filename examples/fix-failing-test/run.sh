#!/usr/bin/env bash
# Copy this example into a scratch git repository and run its loop there, so the
# run's branch and worktree never touch the Loopwright checkout.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dest="${LOOPWRIGHT_HOME:-$HOME/.loopwright}/examples/fix-failing-test"
rm -rf "$dest" && mkdir -p "$dest"
cp -r "$here/calc.py" "$here/tests" "$here/loop.toml" "$dest/"
git -C "$dest" init -q -b main
git -C "$dest" add -A
git -C "$dest" -c user.name=Loopwright -c user.email=loopwright@localhost commit -q -m "example: a failing test"
lw="${LOOPWRIGHT:-$here/../../.venv/bin/loopwright}"
[ -x "$lw" ] || lw=loopwright
if [ -n "${ANTHROPIC_API_KEY:-}${ANTHROPIC_AUTH_TOKEN:-}" ]; then
    exec "$lw" run "$dest/loop.toml"
fi
# No key: the model's side comes from a recorded session (session.json, made with
# `loopwright trace RUN --session`); the sandbox, the tools and the checks are real.
echo "no ANTHROPIC_API_KEY: replaying a recorded model session; set a key to run it live"
exec "$lw" run "$dest/loop.toml" --replay "$here/session.json"
