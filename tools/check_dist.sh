#!/usr/bin/env bash
# Builds the sdist and the wheel, installs the wheel on its own (no dependencies,
# nothing from the checkout) and checks from outside the checkout that the
# installed package imports, runs, and carries py.typed and the license; checks
# that the sdist carries the license too. Dependencies (jax, flax, ...) come from
# the calling environment, so nothing is downloaded but the build backend.
#
#   tools/check_dist.sh            # from the repository root, in the project's venv
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

echo "== build sdist and wheel"
"$PY" -m build --sdist --wheel --outdir "$TMP/dist" . >"$TMP/build.log" 2>&1 || {
    cat "$TMP/build.log"
    exit 1
}
ls "$TMP/dist"
WHEEL=$(ls "$TMP"/dist/*.whl)
SDIST=$(ls "$TMP"/dist/*.tar.gz)

echo "== sdist contents"
tar -tzf "$SDIST" >"$TMP/sdist.txt"
grep -qE '^[^/]+/LICENSE$' "$TMP/sdist.txt" || { echo "LICENSE missing from $SDIST"; exit 1; }
grep -qE '^[^/]+/jax_roialign/py.typed$' "$TMP/sdist.txt" || { echo "py.typed missing from $SDIST"; exit 1; }

echo "== install the wheel alone and import it from outside the checkout"
"$PY" -m pip install -q --no-deps --no-compile --target "$TMP/site" "$WHEEL"
cd "$TMP"
PYTHONPATH="$TMP/site" PYTHONSAFEPATH=1 "$PY" - "$TMP/site" "$ROOT" <<'PYEOF'
import importlib.metadata as md
import sys
from pathlib import Path

site, root = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
import jax_roialign

pkg = Path(jax_roialign.__file__).resolve().parent
assert pkg.is_relative_to(site), f"imported {pkg}, not the installed wheel under {site}"
assert not pkg.is_relative_to(root), f"imported the checkout: {pkg}"
assert (pkg / "py.typed").is_file(), "py.typed missing from the wheel"
dist = md.distribution("jax_roialign")
assert dist.version == jax_roialign.__version__, (dist.version, jax_roialign.__version__)
licenses = [f for f in dist.files if f.name == "LICENSE"]
assert licenses, "LICENSE missing from the wheel's dist-info"
assert "Apache License" in licenses[0].read_text(), "LICENSE is not the Apache License"
assert dist.metadata["License-Expression"] == "Apache-2.0", dist.metadata["License-Expression"]
import jax_roialign.linen, jax_roialign.nnx  # noqa: E401,F401
print(f"installed jax_roialign {dist.version} from {pkg}: py.typed, LICENSE, Apache-2.0 ok")
PYEOF

echo "== the demo from the installed wheel"
PYTHONPATH="$TMP/site" PYTHONSAFEPATH=1 "$PY" -m jax_roialign >"$TMP/demo.log" 2>&1 || {
    cat "$TMP/demo.log"
    exit 1
}
tail -n 3 "$TMP/demo.log"
echo "dist ok"
