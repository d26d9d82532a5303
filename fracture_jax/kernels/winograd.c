/* Winograd F(2x2, 3x3)'s input transform, for fracture_jax/models/winograd.py.
 *
 * x: NHWC (n, h, w, c), float32. v: (16, n, th, tw, c), th = ceil(h / 2), tw = ceil(w / 2):
 * for each 4x4 input tile (one pixel of zero padding before, up to two after), the 16 values
 * of B^T d B, plane by plane. One pass over x, vectorised over the channels and shared out
 * over the tile rows by OpenMP; XLA's own fusion of the same sums ran 3-6x slower. */
#include <stdlib.h>

int winograd_input_transform(const float *restrict x, float *restrict v, long n, long h,
                             long w, long c) {
  const long th = (h + 1) / 2, tw = (w + 1) / 2, plane = n * th * tw * c;
  float *zeros = calloc(c, sizeof(float));
  if (!zeros) return 1;
#pragma omp parallel for collapse(2) schedule(static)
  for (long b = 0; b < n; b++)
    for (long t = 0; t < th; t++)
      for (long u = 0; u < tw; u++) {
        const float *d[4][4];
        for (int i = 0; i < 4; i++)
          for (int j = 0; j < 4; j++) {
            const long y = 2 * t - 1 + i, z = 2 * u - 1 + j;
            const int inside = y >= 0 && y < h && z >= 0 && z < w;
            d[i][j] = inside ? x + ((b * h + y) * w + z) * c : zeros;
          }
        float *out = v + ((b * th + t) * tw + u) * c;
#pragma omp simd
        for (long k = 0; k < c; k++) {
          float r[4][4];  /* B^T d: rows d0 - d2, d1 + d2, d2 - d1, d1 - d3 */
          for (int j = 0; j < 4; j++) {
            const float d0 = d[0][j][k], d1 = d[1][j][k], d2 = d[2][j][k], d3 = d[3][j][k];
            r[0][j] = d0 - d2; r[1][j] = d1 + d2; r[2][j] = d2 - d1; r[3][j] = d1 - d3;
          }
          for (int a = 0; a < 4; a++) {  /* (B^T d) B: the same combinations of columns */
            out[(4 * a + 0) * plane + k] = r[a][0] - r[a][2];
            out[(4 * a + 1) * plane + k] = r[a][1] + r[a][2];
            out[(4 * a + 2) * plane + k] = r[a][2] - r[a][1];
            out[(4 * a + 3) * plane + k] = r[a][1] - r[a][3];
          }
        }
      }
  free(zeros);
  return 0;
}
