// CPU loops that vectorise get an AVX2 clone beside the baseline (SSE2) one,
// chosen at load time by the CPU it runs on: the extension is built without
// -march flags, so it still loads on any x86-64. A helper whose loops should
// run as AVX2 in a clone must be inlined into it (a call goes to the baseline
// code): SELFHEAL_INLINE_INTO_CLONES forces that.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define SELFHEAL_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#define SELFHEAL_INLINE_INTO_CLONES inline __attribute__((always_inline))
#else
#define SELFHEAL_VECTOR_CLONES
#define SELFHEAL_INLINE_INTO_CLONES inline
#endif
