#!/usr/bin/env bash
# Download the wheels that `tools bench-gpu` needs on the device machine and its image lacks
# (Python 3.12, x86-64 Linux; the image has torch, numpy, click, fsspec, psutil, tqdm, pyyaml,
# msgpack, cloudpickle, packaging, typing-extensions, zipp, pytest) into .whl/ (ignored), and
# check that they fit the 64 MiB that one device call carries with the working tree.
#
#   bash tools/device-wheels.sh            # then, on the device (BENCHMARKS.md):
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
WHEELS=(
    zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 crc32c==2.9.post0 google-crc32c==1.9.0
    webdataset==1.0.2 braceexpand==0.1.7
    tensordict==0.8.3 orjson==3.11.5 importlib-metadata==8.7.0  # the official peer's pin
)
LIMIT_MIB=40  # of 64 MiB per call: the rest is the working tree (~8 MiB) and headroom
PYTHON=${PYTHON:-python3}

rm -rf .whl && mkdir .whl
"$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"

status=0
for whl in .whl/*.whl; do  # every wheel must install on CPython 3.12 / x86-64 Linux
    tags=$(basename "$whl" .whl | cut -d- -f3-)
    case "$tags" in
        py3-none-any | py2.py3-none-any | cp312-cp312-*manylinux*x86_64* | cp312-abi3-*manylinux*x86_64* | cp3[0-9]-abi3-*manylinux*x86_64*) ;;
        *) echo "device-wheels: $whl: tags $tags do not install on cp312 manylinux x86_64" >&2; status=1 ;;
    esac
done
total=$(du -cb .whl/*.whl | tail -1 | cut -f1)
echo "device-wheels: $(ls .whl/*.whl | wc -l) wheels, $((total / 1024)) KiB in .whl/"
if (( total > LIMIT_MIB * 1024 * 1024 )); then
    echo "device-wheels: .whl/ holds $((total / 1024 / 1024)) MiB, over the ${LIMIT_MIB} MiB kept" \
        "for wheels of the 64 MiB a device call carries; drop wheels the benchmark does not import" >&2
    status=1
fi
exit $status
