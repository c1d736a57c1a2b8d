#!/usr/bin/env bash
# The export extra: what recipes/merge_export.py needs to write GGUF files that llama.cpp / Ollama load.
#
#   bash launch/setup_export.sh            # after bash launch/setup_env.sh (uses the same .venv)
#   PYTHON=/path/to/python bash launch/setup_export.sh
#   bash launch/setup_export.sh --print-cmake-args   # the CPU flags it adds to CMAKE_ARGS, then exits
#
# 1. pip installs requirements-export.txt (llama-cpp-python==0.3.36, sentencepiece) into the venv.
#    llama-cpp-python COMPILES llama.cpp FROM SOURCE (cmake + gcc): minutes on a workstation, 20-45 minutes
#    on a loaded 2-core machine. Only the libraries the Python package loads are built (no llava/mtmd,
#    examples, tools, server or tests). pip caches the wheel, so a second install takes seconds.
#    Set CMAKE_ARGS yourself to add to the build (e.g. -DGGML_CUDA=on); ours are appended.
# 2. Extracts llama.cpp's own converter from the same version's sdist on the package registry
#    (vendor/llama.cpp/convert_hf_to_gguf.py, conversion/, gguf-py/, LICENSE) into .cache/llama.cpp/
#    (gitignored; override with LLAMA_CPP_DIR). The recipe runs it as
#    `python .cache/llama.cpp/convert_hf_to_gguf.py MERGED_DIR --outfile X.gguf --outtype f16`.
# Both steps are skipped when already done; torch is never installed or upgraded (checked at the end).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || command -v python3)}
DEST=${LLAMA_CPP_DIR:-.cache/llama.cpp}
VERSION=$(sed -n 's/^llama-cpp-python==\([0-9.]*\).*/\1/p' requirements-export.txt)
[[ -n "$VERSION" ]] || { echo "setup_export.sh: no llama-cpp-python==X pin in requirements-export.txt" >&2; exit 1; }
TORCH_BEFORE=$("$PY" -c "import torch; print(torch.__version__)" 2>/dev/null || echo none)

# A native build on a CPU with AMX (Sapphire Rapids and later) turns on ggml's AMX int8 matmul, which
# segfaults on q8_0 / k-quant GGUFs (llama.cpp #20824; CHRONICLES 75): build for the CPU's AVX-512 without AMX.
# CMAKE_ARGS that already choose GGML_NATIVE are left alone.
cpu_cmake_args() {
  if grep -qw amx_int8 "${CPUINFO:-/proc/cpuinfo}" 2>/dev/null && [[ "${CMAKE_ARGS:-}" != *GGML_NATIVE* ]]; then
    echo "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=ON" \
         "-DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
  fi
}
if [[ "${1:-}" == "--print-cmake-args" ]]; then cpu_cmake_args; exit 0; fi

# ---- 1. llama-cpp-python (compiled) + the converter's extra tokenizer dependency -----------------
PIP_EXTRA=()
if [[ -n "$(cpu_cmake_args)" ]]; then
  PIP_EXTRA=(--no-cache-dir)  # pip's cached wheel may be a native (AMX) build
  if "$PY" -c "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())" 2>/dev/null | grep -q "AMX_INT8 = 1"; then
    echo "setup_export.sh: the installed llama-cpp-python uses AMX int8 kernels on this AMX CPU; rebuilding it without (CHRONICLES 75)"
    "$PY" -m pip uninstall -y -q llama-cpp-python
  fi
fi
if "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('llama-cpp-python') != '$VERSION')" 2>/dev/null \
   && "$PY" -c "import llama_cpp, sentencepiece" 2>/dev/null; then
  echo "setup_export.sh: llama-cpp-python $VERSION already installed in $PY"
else
  [[ -z "$(cpu_cmake_args)" ]] || echo "setup_export.sh: this CPU has AMX: building llama.cpp for AVX-512 without AMX (CHRONICLES 75)"
  echo "setup_export.sh: installing llama-cpp-python $VERSION; it compiles llama.cpp from source with cmake + gcc:" \
       "expect 5-45 minutes on a small CPU machine (pip caches the wheel for next time)"
  export CMAKE_ARGS="${CMAKE_ARGS:-} $(cpu_cmake_args) -DLLAVA_BUILD=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_APP=OFF -DGGML_CCACHE=OFF"
  "$PY" -m pip install "${PIP_EXTRA[@]}" -r requirements-export.txt
fi

# ---- 2. llama.cpp's converter, from the same version's sdist --------------------------------------
if [[ -f "$DEST/convert_hf_to_gguf.py" && "$(cat "$DEST/VERSION" 2>/dev/null)" == "$VERSION" ]]; then
  echo "setup_export.sh: converter already in $DEST (llama-cpp-python $VERSION)"
else
  TMP=$(mktemp -d)
  trap 'rm -rf "$TMP"' EXIT
  echo "setup_export.sh: downloading the llama-cpp-python $VERSION sdist for llama.cpp's convert_hf_to_gguf.py"
  "$PY" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$TMP"
  SDIST=$(ls "$TMP"/llama_cpp_python-"$VERSION".tar.gz)
  TOP="llama_cpp_python-$VERSION/vendor/llama.cpp"
  tar -xzf "$SDIST" -C "$TMP" "$TOP/convert_hf_to_gguf.py" "$TOP/conversion" "$TOP/gguf-py/gguf" \
      "$TOP/gguf-py/LICENSE" "$TOP/LICENSE"
  rm -rf "$DEST"
  mkdir -p "$(dirname "$DEST")"
  mv "$TMP/$TOP" "$DEST"
  echo "$VERSION" > "$DEST/VERSION"
  echo "setup_export.sh: converter extracted to $DEST"
fi

# ---- checks: the extra imports, the converter starts, torch untouched ------------------------------
"$PY" -c "import llama_cpp; print('setup_export.sh: llama_cpp', llama_cpp.__version__, 'imports')"
"$PY" "$DEST/convert_hf_to_gguf.py" --help > /dev/null
TORCH_AFTER=$("$PY" -c "import torch; print(torch.__version__)" 2>/dev/null || echo none)
if [[ "$TORCH_BEFORE" != "$TORCH_AFTER" ]]; then
  echo "setup_export.sh: torch changed from $TORCH_BEFORE to $TORCH_AFTER; reinstall the pinned torch (bash launch/setup_env.sh)" >&2
  exit 1
fi
echo "setup_export.sh: done. bash launch/merge_export.sh --adapter_path RUN/adapter now writes GGUF files too"
