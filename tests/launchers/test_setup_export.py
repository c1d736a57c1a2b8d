"""launch/setup_export.sh builds llama.cpp without AMX on a CPU that has it (CHRONICLES 75)."""
import subprocess

from conftest import REPO


def cmake_args(tmp_path, flags: str, cmake_args: str = "") -> str:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f {flags}\n")
    proc = subprocess.run(["bash", "launch/setup_export.sh", "--print-cmake-args"], cwd=REPO, capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin", "CPUINFO": str(cpuinfo), "CMAKE_ARGS": cmake_args})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_an_amx_cpu_gets_a_non_native_build_without_amx(tmp_path):
    args = cmake_args(tmp_path, "avx512_vnni amx_bf16 amx_tile amx_int8").split()
    assert "-DGGML_NATIVE=OFF" in args and "-DGGML_AVX512=ON" in args
    assert {"-DGGML_AMX_INT8=OFF", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_BF16=OFF"} <= set(args)


def test_other_cpus_and_a_users_own_native_choice_keep_the_native_build(tmp_path):
    assert cmake_args(tmp_path, "avx512_vnni") == ""
    assert cmake_args(tmp_path, "amx_int8", cmake_args="-DGGML_NATIVE=ON") == ""
