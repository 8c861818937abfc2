// Shared-memory overruns that only the sanitizer build sees: built with
// -fsanitize=address,undefined -DSIMT_SANITIZE by tests/test_simt_emulator.py.
// Usage: asan_canaries dynamic|static|clean
#include "kernels/device.h"

#include <cstdio>
#include <cstring>
#include <vector>

__global__ void dynamic_overrun_kernel(float* out, int n) {
  DMAX_DYNAMIC_SMEM(float, buf);
  if (static_cast<int>(threadIdx.x) < n) buf[threadIdx.x] = 1.0f;
  __syncthreads();
  out[threadIdx.x] = buf[threadIdx.x + 1];  // the last thread reads buf[n]
}

template <int N>
__global__ void static_overrun_kernel(float* out) {
  __shared__ float s[N];
  s[threadIdx.x] = 1.0f;  // launched with N + 1 threads
  __syncthreads();
  out[threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}

int main(int argc, char** argv) {
  const char* which = argc > 1 ? argv[1] : "clean";
  std::vector<float> out(64);
  if (std::strcmp(which, "dynamic") == 0) {
    DMAX_LAUNCH(dynamic_overrun_kernel, 1, 32, 32 * sizeof(float), nullptr)(out.data(), 32);
  } else if (std::strcmp(which, "static") == 0) {
    DMAX_LAUNCH(static_overrun_kernel<32>, 1, 33, 0, nullptr)(out.data());
  } else {
    DMAX_LAUNCH(dynamic_overrun_kernel, 1, 32, 33 * sizeof(float), nullptr)(out.data(), 32);
    DMAX_LAUNCH(static_overrun_kernel<32>, 1, 32, 0, nullptr)(out.data());
  }
  printf("finished %g\n", out[0]);
  return 0;
}
