// Which builds of the CPU kernels (hatch_build.py) the running CPU and OS can execute.
//
// Compiled for the architecture's baseline, so it loads everywhere the package does. The
// compiler's own CPU probe (__builtin_cpu_supports) checks the OS's register state too
// (XGETBV): a CPU with AVX-512 under an OS that does not save its registers reports none.

extern "C" const char* StablelayersCpuKernelVariants() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                      __builtin_cpu_supports("avx512dq") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  if (avx512) return "avx512,avx2,x86_64";
  if (avx2) return "avx2,x86_64";
  return "x86_64";
#else
  return "baseline";
#endif
}
