// exp(x) for x <= 0 in float32 vectors, shared by the CPU kernels that take a softmax's
// numerators (logits_stats, block_attention). In the capability's namespace, like load_float.h:
// an inline function compiled with different instruction sets must not be merged across the
// copies.
#pragma once
#include <ATen/cpu/vec/vec.h>
#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace dmax::cpu::CPU_CAPABILITY {

// exp(d) for d <= 0 (or -inf), within ~1 ulp: Cody-Waite reduction d = n ln2 + r (|r| <= ln2 / 2,
// ln2 split in a 16-bit head, exact times any n here, and a tail), e^r = 1 + r q(r) with q a
// degree-5 polynomial fitted for the least maximal relative error (2e-9; 9.7e-8 evaluated in
// float32), times 2^n. d is clamped at -87 so that 2^n stays a normal float (n >= -126): a term
// below e^-87 < 2e-38 is counted as that, against a sum >= 1. 12 vector operations where
// at::vec's exp_u20 takes about 20.
inline at::vec::Vectorized<float> exp_nonpositive(const at::vec::Vectorized<float>& d) {
  using Vec = at::vec::Vectorized<float>;
  constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693145751953125f,
                  kLn2Lo = 1.42860682030941723e-6f;
#if defined(CPU_CAPABILITY_AVX512)
  const Vec dc = _mm512_max_ps(Vec(-87.f), d);  // a NaN d is the second operand: it stays NaN
#else
  const Vec dc = at::vec::maximum(d, Vec(-87.f));
#endif
  const Vec nf = (dc * Vec(kLog2e)).round();
  const Vec r = at::vec::fmadd(nf, Vec(-kLn2Lo), at::vec::fmadd(nf, Vec(-kLn2Hi), dc));
  Vec q(0.0013843653723597527f);
  for (const float c : {0.00837415549904108f, 0.04166800156235695f, 0.16666431725025177f,
                        0.4999999403953552f, 1.f})
    q = at::vec::fmadd(q, r, Vec(c));
  const Vec p = at::vec::fmadd(q, r, Vec(1.f));
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_scalef_ps(p, nf);
#else
  using IVec = at::vec::Vectorized<int32_t>;
  const IVec bits = (at::vec::convert_to_int_of_same_size(nf) + IVec(127)) << IVec(23);
  return p * at::vec::cast<float>(bits);
#endif
}

}  // namespace dmax::cpu::CPU_CAPABILITY
