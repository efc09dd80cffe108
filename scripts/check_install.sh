#!/usr/bin/env bash
# The install as a user gets it: build the sdist and the wheel, check that both hold the recipes, install the
# wheel alone (no extras) into a fresh virtual environment, and run every command from outside the checkout
# on a copy of a sample dataset.
#
#     scripts/check_install.sh [SAMPLE_DATASET]      (default: $LESIONSYNTH_DATA/mni_lesions)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
data="${1:-${LESIONSYNTH_DATA:-$repo/.cache/data}/mni_lesions}"
python="${PYTHON:-python3}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
step() { echo "--- $*"; }

step "build sdist and wheel"
"$python" -m venv "$work/build-env"
"$work/build-env/bin/pip" install -q build 2>"$work/pip.log" || { cat "$work/pip.log"; exit 1; }
"$work/build-env/bin/python" -m build -q --outdir "$work/dist" "$repo" >/dev/null
wheel="$(ls "$work"/dist/lesionsynth-*.whl)"
sdist="$(ls "$work"/dist/lesionsynth-*.tar.gz)"
recipes=$(ls "$repo"/recipes/*.toml | wc -l)
in_wheel=$("$python" -c "import sys, zipfile; print(sum(n.startswith('lesionsynth/recipe_files/') and n.endswith('.toml') for n in zipfile.ZipFile(sys.argv[1]).namelist()))" "$wheel")
in_sdist=$(tar -tzf "$sdist" | grep -c '/recipes/.*\.toml$')
echo "recipes: $recipes in recipes/, $in_wheel in the wheel, $in_sdist in the sdist"
[ "$in_wheel" -eq "$recipes" ] && [ "$in_sdist" -eq "$recipes" ]

step "install the wheel alone into a fresh environment"
"$python" -m venv "$work/user-env"
"$work/user-env/bin/pip" install -q "$wheel" 2>"$work/pip.log" || { cat "$work/pip.log"; exit 1; }
"$work/user-env/bin/pip" list 2>/dev/null | grep -Ei "^(torch|dask|pytest|nnunetv2|torchio|monai) " && { echo "extras installed"; exit 1; }
ls=("$work/user-env/bin/lesionsynth")
cp -r "$data" "$work/dataset"
cd "$work"  # nothing of the checkout on the path
"$work/user-env/bin/python" - <<'EOF'
import lesionsynth, pathlib, sys
where = pathlib.Path(lesionsynth.__file__).resolve()
assert "user-env" in str(where), f"lesionsynth imported from {where}, not from the installed wheel"
print("imported from", where.parent)
EOF

step "lesionsynth recipes";  "${ls[@]}" recipes
step "lesionsynth check";    "${ls[@]}" check dataset
step "lesionsynth build-bank --recipe stroke_t1"
"${ls[@]}" build-bank dataset --out bank --recipe stroke_t1 --jobs 2 2>/dev/null
step "lesionsynth generate --jobs 2"
"${ls[@]}" generate bank --out out --n 6 --load high --seed 0 --jobs 2 2>/dev/null
step "lesionsynth generate --jobs 1 (I/O overlapped in threads): the same bytes as --jobs 2"
"${ls[@]}" generate bank --out out1 --n 6 --load high --seed 0 --jobs 1 2>/dev/null
for sub in imagesTr labelsTr; do diff -r "out/$sub" "out1/$sub"; done
cmp out/manifest.jsonl out1/manifest.jsonl && echo "images, labels and manifest identical"
step "lesionsynth generate --shard (x2) and finalize"
"${ls[@]}" generate bank --out sharded --n 4 --load low --seed 0 --jobs 2 --shard 0/2 2>/dev/null
"${ls[@]}" generate bank --out sharded --n 4 --load low --seed 0 --jobs 2 --shard 1/2 2>/dev/null
"${ls[@]}" finalize sharded
step "lesionsynth report";   "${ls[@]}" report out
"$work/user-env/bin/python" -c "import json; a = json.load(open('out/report/realism.json')); assert a['auc'] is not None, a['reason']; print('realism AUC', round(a['auc'], 3))"
step "lesionsynth inspect";  "${ls[@]}" inspect out | head -n 8
step "lesionsynth testset --vary load"
"${ls[@]}" testset bank --out testset --vary load --levels 2 --per-level 1 --test-cases MS_01038 --jobs 2 2>/dev/null
test "$(wc -l < testset/strata.csv)" -eq 3
step "lesionsynth score (the labels against themselves)"
"${ls[@]}" score dataset/labelsTr dataset --out scored --jobs 2 --bootstrap 200
"$work/user-env/bin/python" -c "import json; s = json.load(open('scored/summary.json')); assert s['overall']['dice']['mean'] == 1, s['overall']['dice']"
step "a .mha dataset (converted by SimpleITK itself): build-bank and generate keep the ending"
"$work/user-env/bin/python" - <<'PY'
import json, pathlib, SimpleITK as sitk
src, dst = pathlib.Path("dataset"), pathlib.Path("dataset_mha")
for sub in ("imagesTr", "labelsTr"):
    (dst / sub).mkdir(parents=True)
    for f in sorted((src / sub).glob("*.nii.gz")):
        img = sitk.ReadImage(str(f))
        for key in img.GetMetaDataKeys():
            img.EraseMetaData(key)
        sitk.WriteImage(img, str(dst / sub / (f.name[: -len(".nii.gz")] + ".mha")), useCompression=True)
meta = json.loads((src / "dataset.json").read_text())
(dst / "dataset.json").write_text(json.dumps({**meta, "file_ending": ".mha"}))
PY
"${ls[@]}" build-bank dataset_mha --out bank_mha --jobs 2 2>/dev/null
"${ls[@]}" generate bank_mha --out out_mha --n 2 --load high --seed 0 --jobs 2 2>/dev/null
"$work/user-env/bin/python" -c "import json; assert json.load(open('out_mha/dataset.json'))['file_ending'] == '.mha'"
test -f out_mha/labelsTr/syn00000.mha && test -f out_mha/imagesTr/syn00001_0000.mha && echo "output written as .mha"

step "one-line errors"
if "${ls[@]}" build-bank dataset --out bank2 --recipe no_such_recipe 2>err.txt; then exit 1; fi
cat err.txt; [ "$(wc -l <err.txt)" -eq 1 ]
if "${ls[@]}" generate bank --out cuda --n 1 --load low --device cuda 2>err.txt; then exit 1; fi
cat err.txt; [ "$(wc -l <err.txt)" -eq 1 ] && [ ! -e cuda/imagesTr ]
step "the transforms without their extras: one line naming the extra"
"$work/user-env/bin/python" - <<'EOF'
for name, extra in (("RandomLesionMix", "torchio"), ("RandLesionMixd", "monai")):
    try:
        exec(f"from lesionsynth.transforms import {name}")
    except ImportError as exc:
        print(exc)
        assert f"pip install 'lesionsynth[{extra}]'" in str(exc) and "\n" not in str(exc)
    else:
        raise SystemExit(f"{name} imported without the [{extra}] extra")
EOF
echo "install check passed"
