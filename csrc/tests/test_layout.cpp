// CTest: the shared index arithmetic (csrc/include/tenvoo_fast/layout.h) against known values,
// without torch. The cases are TenVOO-L's last step for a 4->6 3x3x3 conv (weight letters
// ABCabcxyz), whose offsets are written out by hand below, and the packed-layout parser.
#include <cstdio>
#include <cstdlib>

#include "tenvoo_fast/layout.h"

using namespace tenvoo_fast;

static int failures = 0;

#define EXPECT_EQ(a, b)                                                                  \
  do {                                                                                   \
    const long long va = static_cast<long long>(a), vb = static_cast<long long>(b);      \
    if (va != vb) {                                                                      \
      std::fprintf(stderr, "%s:%d: %s == %lld, expected %lld\n", __FILE__, __LINE__, #a, \
                   va, vb);                                                              \
      ++failures;                                                                        \
    }                                                                                    \
  } while (0)

int main() {
  // Weight (O=6, I=4, 3, 3, 3) with O = A*B*C = 3*2*1 and I = a*b*c = 2*2*1: letters
  // A B C a b c x y z, sizes 3 2 1 2 2 1 3 3 3, contiguous strides 216 108 108 54 27 27 9 3 1.
  // Rows = a b c x (left operand), columns = A B C y z (right operand), no batch.
  const long long packed[] = {0,                                   // batch: no letters
                              4, 2, 2, 1, 3, 54, 27, 27, 9,        // rows a b c x
                              5, 3, 2, 1, 3, 3, 216, 108, 108, 3, 1};  // cols A B C y z
  Groups gs;
  const int64_t* p = reinterpret_cast<const int64_t*>(packed);
  EXPECT_EQ(parse_groups(p, sizeof(packed) / sizeof(packed[0]), &gs), true);
  EXPECT_EQ(group_numel(gs.batch), 1);
  EXPECT_EQ(group_numel(gs.rows), 12);   // M = 2*2*1*3
  EXPECT_EQ(group_numel(gs.cols), 54);   // N = 3*2*1*3*3
  // Row m = (a, b, c, x) in mixed radix (2, 2, 1, 3): m = 7 -> a=1, b=0, c=0, x=1.
  EXPECT_EQ(group_offset(gs.rows, 7), 1 * 54 + 0 * 27 + 0 * 27 + 1 * 9);
  // Column n = (A, B, C, y, z) in (3, 2, 1, 3, 3): n = 53 -> A=2, B=1, C=0, y=2, z=2.
  EXPECT_EQ(group_offset(gs.cols, 53), 2 * 216 + 1 * 108 + 2 * 3 + 2);
  EXPECT_EQ(group_offset(gs.cols, 0), 0);
  // Columns A B C y z: y z (strides 3, 1) form runs of 9; the rows' innermost stride is 9.
  EXPECT_EQ(contiguous_run(gs.cols), 9);
  EXPECT_EQ(contiguous_run(gs.rows), 1);
  EXPECT_EQ(group_offset(gs.cols, 9 + 4), group_offset(gs.cols, 9) + 4);
  // The last element of the GEMM lands on the last element of the weight.
  EXPECT_EQ(weight_offset(gs, 0, 11, 53), 6 * 4 * 27 - 1);
  // Every (m, n) lands on a distinct offset that covers the weight exactly once.
  static bool seen[6 * 4 * 27] = {};
  for (int64_t m = 0; m < 12; ++m)
    for (int64_t n = 0; n < 54; ++n) {
      const int64_t o = weight_offset(gs, 0, m, n);
      EXPECT_EQ(o >= 0 && o < 648 && !seen[o], true);
      if (o >= 0 && o < 648) seen[o] = true;
    }
  // A batch group adds its own offset.
  const long long batched[] = {1, 4, 100, 1, 5, 2, 1, 7, 1};
  Groups gb;
  EXPECT_EQ(parse_groups(reinterpret_cast<const int64_t*>(batched), 9, &gb), true);
  EXPECT_EQ(weight_offset(gb, 3, 4, 6), 300 + 8 + 6);
  EXPECT_EQ(contiguous_run(gb.cols), 7);
  EXPECT_EQ(contiguous_run(gb.batch), 1);
  // Malformed packings are refused: truncated, too many letters, zero size, trailing data.
  const long long truncated[] = {1, 4};
  EXPECT_EQ(parse_groups(reinterpret_cast<const int64_t*>(truncated), 2, &gb), false);
  const long long too_many[] = {9};
  EXPECT_EQ(parse_groups(reinterpret_cast<const int64_t*>(too_many), 1, &gb), false);
  const long long zero_size[] = {1, 0, 1, 0, 0};
  EXPECT_EQ(parse_groups(reinterpret_cast<const int64_t*>(zero_size), 5, &gb), false);
  const long long trailing[] = {0, 0, 0, 42};
  EXPECT_EQ(parse_groups(reinterpret_cast<const int64_t*>(trailing), 4, &gb), false);
  // The fold: base + (scale*acc - frozen), and exactly base when acc*scale == frozen.
  EXPECT_EQ(fold<double>(2.0, 0.5, true, true, 1.0, true, 3.0) == 3.0, true);
  EXPECT_EQ(fold<float>(0.1f, 3.0f, true, true, 0.1f * 3.0f, true, 0.25f) == 0.25f, true);
  EXPECT_EQ(fold<double>(2.0, 0.5, true, false, 0.0, false, 0.0) == 1.0, true);
  EXPECT_EQ(ceil_div(10, 4), 3);
  if (failures) std::fprintf(stderr, "%d failure(s)\n", failures);
  else std::printf("layout: all checks passed\n");
  return failures ? EXIT_FAILURE : EXIT_SUCCESS;
}
