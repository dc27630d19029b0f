# One place that finds every external dependency; targets link the imported
# names below and nothing else.
find_package(Threads REQUIRED)
find_package(OpenMP REQUIRED COMPONENTS CXX)
# Debian ships no CMake config for protobuf: use CMake's FindProtobuf.
find_package(Protobuf REQUIRED)
find_package(gRPC CONFIG REQUIRED)
find_package(absl CONFIG REQUIRED)
find_package(SQLite3 REQUIRED)  # the coordinator's job store (services/coordinator/job_store.h)
find_package(OpenSSL REQUIRED)  # rpc/security.cc checks TLS certificates at start-up
find_package(nlohmann_json 3.10 CONFIG REQUIRED)
find_package(prometheus-cpp CONFIG REQUIRED)
if(MUONPS_BUILD_TESTS)
  find_package(GTest REQUIRED)
endif()

# OpenBLAS, OpenMP build. It computes a call on the calling thread alone
# whenever that thread's omp_get_max_threads() is 1 or it runs inside an
# active parallel region; common/gemm.h guarantees one or the other for every
# call, so no result depends on OpenBLAS's threading and all parallelism is
# muonps's own OpenMP loops. (Debian's single-threaded build is not safe to
# call from several threads at once: it shares unlocked work buffers.) Debian
# installs several OpenBLAS builds side by side and picks one for
# libopenblas.so.0 through update-alternatives, so the binaries carry a
# RUNPATH to the OpenMP build's directory, and CheckBlasRuntime() refuses to
# run on any other build.
find_path(MUONPS_OPENBLAS_OPENMP_INCLUDE_DIR cblas.h
  PATHS /usr/include/x86_64-linux-gnu/openblas-openmp
        /usr/include/aarch64-linux-gnu/openblas-openmp
  NO_DEFAULT_PATH)
find_library(MUONPS_OPENBLAS_OPENMP_LIBRARY openblas
  PATHS /usr/lib/x86_64-linux-gnu/openblas-openmp
        /usr/lib/aarch64-linux-gnu/openblas-openmp
  NO_DEFAULT_PATH)
if(NOT MUONPS_OPENBLAS_OPENMP_INCLUDE_DIR OR NOT MUONPS_OPENBLAS_OPENMP_LIBRARY)
  message(FATAL_ERROR "OpenBLAS (OpenMP build) not found: run scripts/install_deps.sh")
endif()
get_filename_component(MUONPS_OPENBLAS_OPENMP_LIBRARY_DIR ${MUONPS_OPENBLAS_OPENMP_LIBRARY} DIRECTORY)
add_library(muonps_openblas INTERFACE)
target_include_directories(muonps_openblas SYSTEM INTERFACE ${MUONPS_OPENBLAS_OPENMP_INCLUDE_DIR})
target_link_libraries(muonps_openblas INTERFACE ${MUONPS_OPENBLAS_OPENMP_LIBRARY} OpenMP::OpenMP_CXX)
target_link_options(muonps_openblas INTERFACE "LINKER:--enable-new-dtags,-rpath,${MUONPS_OPENBLAS_OPENMP_LIBRARY_DIR}")
message(STATUS "OpenBLAS: ${MUONPS_OPENBLAS_OPENMP_LIBRARY}")

# CUDA is optional: the CPU build never needs it, but when nvcc exists the
# GPU target is compiled so it cannot rot.
if(NOT MUONPS_CUDA STREQUAL "OFF")
  if(NOT CMAKE_CUDA_COMPILER AND EXISTS /usr/local/cuda/bin/nvcc)
    set(CMAKE_CUDA_COMPILER /usr/local/cuda/bin/nvcc)
  endif()
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
      set(CMAKE_CUDA_ARCHITECTURES 90)
    endif()
    enable_language(CUDA)
    find_package(CUDAToolkit REQUIRED)
    set(MUONPS_HAVE_CUDA ON)
    message(STATUS "CUDA: ${CMAKE_CUDA_COMPILER} (architectures ${CMAKE_CUDA_ARCHITECTURES})")
  elseif(MUONPS_CUDA STREQUAL "ON")
    message(FATAL_ERROR "MUONPS_CUDA=ON but no CUDA compiler was found")
  else()
    message(STATUS "CUDA: nvcc not found, GPU target skipped")
  endif()
endif()
