/* Stand-in for the CUDA driver library (libcuda.so.1) on machines without an NVIDIA driver.
 *
 * Why: TVM's CUDA runtime library links against libcuda.so.1.  Where it cannot be loaded
 * (a build machine, CI), TVM silently compiles CUDA modules to *source* that the GPU machine
 * must then compile at load time with the full TVM compiler.  With this stub loaded, TVM's
 * CUDA runtime registers, the build calls nvcc and the library embeds a fatbin.  Every entry
 * point reports that there is no device; nothing here ever runs a kernel.
 *
 * The symbol list is what libtvm_runtime_cuda.so imports from libcuda (apache-tvm 0.27);
 * ctc.backends.tvm.cuda_toolchain checks it against the installed library before use.
 */
typedef int CUresult;
#define CTC_NO_DEVICE 100 /* CUDA_ERROR_NO_DEVICE */

static const char kName[] = "CUDA_ERROR_NO_DEVICE";
static const char kText[] = "ctc stub libcuda: no CUDA driver on this machine (build-only)";

CUresult cuGetErrorName(CUresult e, const char **s) { (void)e; *s = kName; return 0; }
CUresult cuGetErrorString(CUresult e, const char **s) { (void)e; *s = kText; return 0; }
CUresult cuInit(unsigned flags) { (void)flags; return CTC_NO_DEVICE; }
CUresult cuDeviceGetCount(int *n) { *n = 0; return CTC_NO_DEVICE; }
CUresult cuDeviceGetName(char *n, int l, int d) { (void)n; (void)l; (void)d; return CTC_NO_DEVICE; }
CUresult cuFuncSetAttribute(void *f, int a, int v) { (void)f; (void)a; (void)v; return CTC_NO_DEVICE; }
CUresult cuLaunchKernelEx(const void *c, void *f, void **p, void **e) {
  (void)c; (void)f; (void)p; (void)e; return CTC_NO_DEVICE;
}
CUresult cuModuleGetFunction(void **f, void *m, const char *n) { (void)f; (void)m; (void)n; return CTC_NO_DEVICE; }
CUresult cuModuleLoadData(void **m, const void *i) { (void)m; (void)i; return CTC_NO_DEVICE; }
CUresult cuModuleUnload(void *m) { (void)m; return CTC_NO_DEVICE; }
CUresult cuTensorMapEncodeTiled(void *t, int a, unsigned r, void *g, const void *d, const void *s, const void *b,
                                const void *e, int i, int sw, int l2, int oob) {
  (void)t; (void)a; (void)r; (void)g; (void)d; (void)s; (void)b; (void)e; (void)i; (void)sw; (void)l2; (void)oob;
  return CTC_NO_DEVICE;
}
