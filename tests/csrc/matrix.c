#include "csrc.h"

const int matrix_variant = CASFS_VARIANT;

void csrc_matmul(const double *a, const double *b, double *c, int n)
{
    for (int i = 0; i < n; i++)
        for (int j = 0; j < n; j++) {
            double s = 0.0;
            for (int k = 0; k < n; k++)
                s += a[i * n + k] * b[k * n + j];
            c[i * n + j] = s;
        }
}

double csrc_trace(const double *a, int n)
{
    double t = 0.0;
    for (int i = 0; i < n; i++)
        t += a[i * n + i];
    return t;
}

void csrc_transpose(double *a, int n)
{
    for (int i = 0; i < n; i++)
        for (int j = i + 1; j < n; j++) {
            double t = a[i * n + j];
            a[i * n + j] = a[j * n + i];
            a[j * n + i] = t;
        }
}
