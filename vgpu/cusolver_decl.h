// cusolver_decl.h: the part of cuSOLVER's dense API (cusolverDn.h, cusolver_common.h) that the
// virtual GPU implements, declared from NVIDIA's documentation because the cuSOLVER headers are
// not installed. Enum values as documented (cross-checked against cudarc 0.19.10's generated
// bindings, src/cusolver/sys/mod.rs, feature cuda-13000).
#pragma once

#include <cuda.h>

#ifndef VGPU_EXPORT
#define VGPU_EXPORT extern "C" __attribute__((visibility("default")))
#endif

typedef enum {
  CUSOLVER_STATUS_SUCCESS = 0,
  CUSOLVER_STATUS_NOT_INITIALIZED = 1,
  CUSOLVER_STATUS_ALLOC_FAILED = 2,
  CUSOLVER_STATUS_INVALID_VALUE = 3,
  CUSOLVER_STATUS_ARCH_MISMATCH = 4,
  CUSOLVER_STATUS_MAPPING_ERROR = 5,
  CUSOLVER_STATUS_EXECUTION_FAILED = 6,
  CUSOLVER_STATUS_INTERNAL_ERROR = 7,
  CUSOLVER_STATUS_MATRIX_TYPE_NOT_SUPPORTED = 8,
  CUSOLVER_STATUS_NOT_SUPPORTED = 9,
  CUSOLVER_STATUS_ZERO_PIVOT = 10,
  CUSOLVER_STATUS_INVALID_LICENSE = 11,
} cusolverStatus_t;

typedef enum {
  CUSOLVER_EIG_MODE_NOVECTOR = 0,
  CUSOLVER_EIG_MODE_VECTOR = 1,
} cusolverEigMode_t;

struct cusolverDnContext;
typedef struct cusolverDnContext* cusolverDnHandle_t;
struct gesvdjInfo;
typedef struct gesvdjInfo* gesvdjInfo_t;
typedef struct CUstream_st* cudaStream_t;

VGPU_EXPORT cusolverStatus_t cusolverDnCreate(cusolverDnHandle_t* handle);
VGPU_EXPORT cusolverStatus_t cusolverDnDestroy(cusolverDnHandle_t handle);
VGPU_EXPORT cusolverStatus_t cusolverDnSetStream(cusolverDnHandle_t handle, cudaStream_t streamId);
VGPU_EXPORT cusolverStatus_t cusolverDnGetStream(cusolverDnHandle_t handle, cudaStream_t* streamId);

VGPU_EXPORT cusolverStatus_t cusolverDnCreateGesvdjInfo(gesvdjInfo_t* info);
VGPU_EXPORT cusolverStatus_t cusolverDnDestroyGesvdjInfo(gesvdjInfo_t info);
VGPU_EXPORT cusolverStatus_t cusolverDnXgesvdjSetTolerance(gesvdjInfo_t info, double tolerance);
VGPU_EXPORT cusolverStatus_t cusolverDnXgesvdjSetMaxSweeps(gesvdjInfo_t info, int max_sweeps);
VGPU_EXPORT cusolverStatus_t cusolverDnXgesvdjSetSortEig(gesvdjInfo_t info, int sort_svd);
VGPU_EXPORT cusolverStatus_t cusolverDnXgesvdjGetResidual(cusolverDnHandle_t handle, gesvdjInfo_t info,
                                                          double* residual);
VGPU_EXPORT cusolverStatus_t cusolverDnXgesvdjGetSweeps(cusolverDnHandle_t handle, gesvdjInfo_t info,
                                                        int* executed_sweeps);

VGPU_EXPORT cusolverStatus_t cusolverDnSgesvdj_bufferSize(cusolverDnHandle_t handle, cusolverEigMode_t jobz, int econ,
                                                          int m, int n, const float* A, int lda, const float* S,
                                                          const float* U, int ldu, const float* V, int ldv,
                                                          int* lwork, gesvdjInfo_t params);
VGPU_EXPORT cusolverStatus_t cusolverDnSgesvdj(cusolverDnHandle_t handle, cusolverEigMode_t jobz, int econ, int m,
                                               int n, float* A, int lda, float* S, float* U, int ldu, float* V,
                                               int ldv, float* work, int lwork, int* info, gesvdjInfo_t params);
