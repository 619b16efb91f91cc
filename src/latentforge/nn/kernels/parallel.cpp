// Which threads lf_parallel (common.h) runs the kernels' tasks on, for nn/native.py's `runtime()`: 1 for
// OpenMP's team (PyTorch's pool where the library shares torch's libgomp), 0 for threads started per call.
extern "C" int lf_parallel_runtime() {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}
