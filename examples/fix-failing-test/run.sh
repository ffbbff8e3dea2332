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
exec "$lw" run "$dest/loop.toml"
