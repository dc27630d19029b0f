# One place that finds every external dependency; targets link the imported
# names below and nothing else.
find_package(Threads REQUIRED)
find_package(OpenMP REQUIRED COMPONENTS CXX)
# Debian ships no CMake config for protobuf: use CMake's FindProtobuf.
find_package(Protobuf REQUIRED)
find_package(gRPC CONFIG REQUIRED)
find_package(absl CONFIG REQUIRED)
find_package(nlohmann_json 3.10 CONFIG REQUIRED)
find_package(prometheus-cpp CONFIG REQUIRED)
if(MUONPS_BUILD_TESTS)
  find_package(GTest REQUIRED)
endif()

# OpenBLAS, OpenMP flavour: BLAS and our kernels then share one OpenMP pool
# instead of two sets of spinning threads.
find_path(OPENBLAS_INCLUDE_DIR cblas.h
  PATHS /usr/include/x86_64-linux-gnu/openblas-openmp
        /usr/include/aarch64-linux-gnu/openblas-openmp
        /usr/include/openblas
  NO_DEFAULT_PATH)
find_library(OPENBLAS_LIBRARY openblas
  PATHS /usr/lib/x86_64-linux-gnu/openblas-openmp
        /usr/lib/aarch64-linux-gnu/openblas-openmp
  NO_DEFAULT_PATH)
if(NOT OPENBLAS_INCLUDE_DIR OR NOT OPENBLAS_LIBRARY)
  message(FATAL_ERROR "OpenBLAS (OpenMP build) not found: run scripts/install_deps.sh")
endif()
add_library(muonps_openblas INTERFACE)
target_include_directories(muonps_openblas SYSTEM INTERFACE ${OPENBLAS_INCLUDE_DIR})
target_link_libraries(muonps_openblas INTERFACE ${OPENBLAS_LIBRARY} OpenMP::OpenMP_CXX)
message(STATUS "OpenBLAS: ${OPENBLAS_LIBRARY}")

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
